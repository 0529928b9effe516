"""agents.common.logprobs against a naive full-vocabulary log-softmax, on the tiny random-weight model.

The tiny model's default initialisation (std 0.02) makes it almost uniform: every log-prob is ≈ −log 49152 ≈
−10.8, so a wrong mask, an off-by-one or a context leak would move results by ~1e-3 only. The fixture re-draws
its weights with a larger spread (seeded), which makes the next-token distributions peaked and context-dependent
(changing one earlier token moves later log-probs by ~1), so every check below has teeth.
"""

from __future__ import annotations

import copy

import pytest
import torch

from agents.common.logprobs import (
    decoder_hidden_states,
    position_ids_from_attention_mask,
    sequence_logprobs,
    token_logprobs,
)
from dialogue_gym.models import load_model, resolve_device

PAD = 2
DEVICE = resolve_device("auto")  # the suite's device (tests/conftest.py: --device / DIALOGUE_GYM_DEVICE)

# A three-turn dialogue as token segments (ids are arbitrary vocabulary entries, drawn below):
# [user1 ×3][asst1 ×3][user2 ×2][asst2 ×4][user3 ×2][asst3 ×2] -> T = 16; turn h = 2 is positions 8..11.
SEGMENTS = {"user1": (0, 3), "asst1": (3, 6), "user2": (6, 8), "asst2": (8, 12), "user3": (12, 14), "asst3": (14, 16)}
T_DIALOGUE = 16


@pytest.fixture(autouse=True)
def _tensors_on_the_suite_device():
    """Every tensor these tests build lands on the model's device (random draws stay on the CPU generator)."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


def cpu_draw(shape, std, seed_or_generator) -> torch.Tensor:
    """Normal draws from a seeded CPU generator (the same numbers on every device), moved to DEVICE."""
    g = seed_or_generator if isinstance(seed_or_generator, torch.Generator) else torch.Generator().manual_seed(
        seed_or_generator)
    return torch.empty(shape, device="cpu").normal_(0.0, std, generator=g).to(DEVICE)


def cpu_randint(low, high, shape, seed) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed), device="cpu").to(DEVICE)


@pytest.fixture(scope="module")
def model():
    # fp32 on every device: these tests check the arithmetic of the log-prob functions to 1e-5
    m, _ = load_model("tiny", shared=False, dtype="float32", device=DEVICE)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.copy_(cpu_draw(p.shape, 0.3 if "embed" in name else 0.15, g))
    m.eval()
    return m


def dialogue(seed: int = 0) -> torch.Tensor:
    return cpu_randint(3, 5000, (1, T_DIALOGUE), seed)


def span_mask(*names: str, length: int = T_DIALOGUE) -> torch.Tensor:
    mask = torch.zeros(1, length, dtype=torch.long)
    for name in names:
        a, b = SEGMENTS[name]
        mask[0, a:b] = 1
    return mask


def naive_token_logprobs(model, ids, attention_mask, temperature=1.0, position_ids=None):
    """(B, T) log p(x_t | x_<t) from the full (B, T, V) logits; position 0 gets 0."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()
    logp = torch.log_softmax(logits / temperature, dim=-1)  # (B, T, V)
    out = torch.zeros(ids.shape)
    out[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return out


def test_equals_naive_full_log_softmax(model):
    # three rows, right-padded to 10: lengths 10, 7, 4; masks pick different spans
    ids = cpu_randint(3, 5000, (3, 10), 3)
    am = torch.ones(3, 10, dtype=torch.long)
    am[1, 7:] = 0
    am[2, 4:] = 0
    ids[am == 0] = PAD
    lm = torch.zeros(3, 10, dtype=torch.long)
    lm[0, 1:10] = 1  # every predictable token
    lm[1, 3:7] = 1
    lm[2, 2:4] = 1
    for temperature in (1.0, 0.7):
        naive = naive_token_logprobs(model, ids, am, temperature) * lm
        with torch.inference_mode():
            got = token_logprobs(model, ids, am, lm, temperature=temperature)
            seq = sequence_logprobs(model, ids, am, lm, temperature=temperature)
        torch.testing.assert_close(got, naive, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seq, naive.sum(-1), atol=1e-4, rtol=1e-5)
        assert (got[lm == 0] == 0).all()


def test_temperature_divides_the_logits(model):
    ids, am, lm = dialogue(), torch.ones(1, T_DIALOGUE, dtype=torch.long), span_mask("asst2")
    with torch.inference_mode():
        at_1 = sequence_logprobs(model, ids, am, lm, temperature=1.0)
        at_07 = sequence_logprobs(model, ids, am, lm, temperature=0.7)
        logits = model(input_ids=ids).logits[0, 7:11].float()  # the states that predict positions 8..11
    # by hand: log p_T(y) = z_y / T − logsumexp(z / T), summed over the four turn-2 tokens
    targets = ids[0, 8:12]
    by_hand = sum(
        (logits[i, targets[i]] / 0.7 - torch.logsumexp(logits[i] / 0.7, dim=-1)).item() for i in range(4)
    )
    assert at_07.item() == pytest.approx(by_hand, abs=1e-4)
    assert abs(at_07.item() - at_1.item()) > 0.1  # the temperature is really applied


def test_only_turn_h_tokens_count(model):
    """Only the turn-h assistant tokens contribute, and nothing after them leaks in.

    Tokens before turn h are its context, so changing them MUST change log p(turn h | context) — the test checks
    that too, to prove it is sensitive. What may not matter: (1) any token after the turn (a later user
    message, a later assistant reply); (2) the log-probs of tokens outside the mask — they add exactly nothing,
    which the additivity check shows: value(asst1 ∪ asst2) = value(asst1) + value(asst2), and value(asst2)
    is the naive per-token sum over positions 8..11 only.
    """
    ids, am = dialogue(), torch.ones(1, T_DIALOGUE, dtype=torch.long)
    turn2 = span_mask("asst2")
    with torch.inference_mode():
        base = sequence_logprobs(model, ids, am, turn2).item()

        later = ids.clone()
        later[0, 12] = 4321  # a user token of turn 3
        later[0, 15] = 1234  # an assistant token of turn 3
        assert sequence_logprobs(model, later, am, turn2).item() == pytest.approx(base, abs=1e-5)

        earlier = ids.clone()
        earlier[0, 1] = 4321  # a user token of turn 1
        earlier[0, 4] = 1234  # an assistant token of turn 1
        assert abs(sequence_logprobs(model, earlier, am, turn2).item() - base) > 0.05  # context conditions turn 2

        naive = naive_token_logprobs(model, ids, am)
        assert base == pytest.approx(naive[0, 8:12].sum().item(), abs=1e-4)
        turn1 = sequence_logprobs(model, ids, am, span_mask("asst1")).item()
        both = sequence_logprobs(model, ids, am, span_mask("asst1", "asst2")).item()
        assert both == pytest.approx(turn1 + base, abs=1e-4)
        assert abs(turn1) > 1.0
        # a mask shifted by one position (the classic off-by-one) gives a different number
        shifted = torch.roll(turn2, 1, dims=1)
        assert abs(sequence_logprobs(model, ids, am, shifted).item() - base) > 0.05


def test_left_padding_invariance(model):
    ids, lm = dialogue(), span_mask("asst2")
    am = torch.ones_like(ids)
    with torch.inference_mode():
        alone = sequence_logprobs(model, ids, am, lm)
        # the same dialogue left-padded by 5 in a batch with a longer, unpadded row
        other = cpu_randint(3, 5000, (1, T_DIALOGUE + 5), 9)
        padded = torch.cat([torch.full((1, 5), PAD), ids], dim=1)
        batch_ids = torch.cat([padded, other])
        batch_am = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), am], 1), torch.ones(1, T_DIALOGUE + 5)])
        batch_lm = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), lm], 1), torch.zeros(1, T_DIALOGUE + 5)])
        batch_lm[1, 10:15] = 1
        left = sequence_logprobs(model, batch_ids, batch_am.long(), batch_lm.long())
        # and right-padded
        zeros = torch.zeros(1, 5, dtype=torch.long)
        right = sequence_logprobs(
            model, torch.cat([ids, torch.full((1, 5), PAD)], 1), torch.cat([am, zeros], 1), torch.cat([lm, zeros], 1)
        )
        other_alone = sequence_logprobs(model, other, torch.ones_like(other), batch_lm[1:].long())
    assert left[0].item() == pytest.approx(alone.item(), abs=1e-5)
    assert right.item() == pytest.approx(alone.item(), abs=1e-5)
    assert left[1].item() == pytest.approx(other_alone.item(), abs=1e-5)


def test_position_ids_from_attention_mask():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    torch.testing.assert_close(position_ids_from_attention_mask(am), torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]))


def test_lm_head_sees_only_masked_positions_in_chunks(model):
    ids = cpu_randint(3, 5000, (4, 16), 5)
    am = torch.ones_like(ids)
    lm = torch.zeros_like(ids)
    lm[:, 9:14] = 1  # 4 rows × 5 positions = 20 targets
    rows_seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].shape))
    try:
        results = {}
        for chunk in (1, 6, 1000):
            rows_seen.clear()
            with torch.inference_mode():
                results[chunk] = token_logprobs(model, ids, am, lm, chunk_size=chunk)
            # 2-D (rows, hidden) inputs, never (B, T, hidden); at most `chunk` rows; 20 in all
            assert all(len(s) == 2 and s[0] <= chunk for s in rows_seen)
            assert sum(s[0] for s in rows_seen) == 20
    finally:
        hook.remove()
    torch.testing.assert_close(results[1], results[1000], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[6], results[1000], atol=1e-5, rtol=0)


def test_gradients_match_naive_and_inference_mode(model):
    ids = torch.cat([torch.full((1, 3), PAD), dialogue()], 1)  # left-padded: padding rows must not poison grads
    am = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, T_DIALOGUE, dtype=torch.long)], 1)
    lm = torch.cat([torch.zeros(1, 3, dtype=torch.long), span_mask("asst2")], 1)
    params = dict(model.named_parameters())
    probe = "model.layers.0.self_attn.q_proj.weight"

    model.zero_grad()
    value = sequence_logprobs(model, ids, am, lm, temperature=0.8, chunk_size=2)  # 2 checkpointed chunks
    value.sum().backward()
    got = {n: p.grad.clone() for n, p in params.items()}
    assert all(torch.isfinite(g).all() for g in got.values())
    assert got[probe].abs().sum() > 0 and got["model.embed_tokens.weight"].abs().sum() > 0

    model.zero_grad()
    pos = position_ids_from_attention_mask(am)
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float() / 0.8
    naive = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (naive * lm[:, 1:]).sum().backward()
    # gradients reach |g| ≈ 5 here; chunked fp32 matmuls round differently (seen: 3e-5), a real bug moves them by O(1)
    torch.testing.assert_close(got[probe], params[probe].grad, atol=5e-4, rtol=1e-3)
    model.zero_grad()

    with torch.inference_mode():
        frozen = sequence_logprobs(model, ids, am, lm, temperature=0.8)
    assert not frozen.requires_grad
    assert frozen.item() == pytest.approx(value.item(), abs=1e-5)


def test_peft_wrapped_model(model):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # LoRA B starts at 0 (no change); make the adapter matter
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(cpu_draw(p.shape, 0.5, 2))
    ids, am, lm = dialogue(), torch.ones(1, T_DIALOGUE, dtype=torch.long), span_mask("asst2")
    with torch.inference_mode():
        base_value = sequence_logprobs(model, ids, am, lm).item()
    value = sequence_logprobs(wrapped, ids, am, lm)
    naive = naive_token_logprobs(wrapped, ids, am)[0, 8:12].sum().item()
    assert value.item() == pytest.approx(naive, abs=1e-4)
    assert abs(value.item() - base_value) > 0.05  # the adapter is really in the path
    value.sum().backward()
    lora_grads = [p.grad for n, p in wrapped.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads) and any(g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in wrapped.named_parameters() if "lora_" not in n)
    assert decoder_hidden_states(wrapped, ids, am).shape == (1, T_DIALOGUE, model.config.hidden_size)


def test_empty_mask_row_gives_zero(model):
    ids = dialogue()
    am = torch.ones_like(ids)
    with torch.inference_mode():
        assert sequence_logprobs(model, ids, am, torch.zeros_like(ids)).tolist() == [0.0]


@pytest.mark.parametrize(("change", "match"), [
    ({"loss_mask": torch.ones(1, 4, dtype=torch.long)}, "loss_mask is 1 at position 0"),
    ({"loss_mask": torch.tensor([[0, 0, 1, 1]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])},
     "loss_mask is 1 at a padding position"),
    ({"loss_mask": torch.zeros(1, 5, dtype=torch.long)}, r"loss_mask has shape \(1, 5\) but input_ids has \(1, 4\)"),
    ({"attention_mask": torch.full((1, 4), 2)}, "attention_mask must contain only 0 and 1"),
    ({"input_ids": torch.zeros(4, dtype=torch.long)}, r"input_ids must have shape \(B, T\)"),
    ({"input_ids": torch.zeros(1, 4)}, "input_ids must be an integer tensor"),
    ({"temperature": 0.0}, "temperature must be a number > 0"),
    ({"chunk_size": 0}, "chunk_size must be an int >= 1"),
])
def test_bad_inputs(model, change, match):
    args = {
        "input_ids": torch.tensor([[5, 6, 7, 8]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "loss_mask": torch.tensor([[0, 0, 1, 1]]),
    }
    args.update(change)
    with pytest.raises(ValueError, match=match):
        token_logprobs(model, **args)

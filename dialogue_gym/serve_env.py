"""Serve dialogue-gym as an OpenEnv environment (needs ``pip install 'dialogue-gym[integrations]'``).

    python -m dialogue_gym.serve_env                                   # embedded task, LLM user and judge
    python -m dialogue_gym.serve_env +env=clarify port=8001 max_sessions=16
    python -m dialogue_gym.serve_env +env=arithmetic env.max_turns=3 host=0.0.0.0

Clients connect with :class:`dialogue_gym.integrations.openenv.DialogueGymClient` (or any OpenEnv client) at
``http://HOST:PORT``; each connection is a session with its own episode over the shared user and reward model.
The server is openenv's FastAPI app under uvicorn; it listens on loopback unless ``host`` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@dataclass
class ServeConfig:
    """Settings of ``python -m dialogue_gym.serve_env``."""

    env: dict[str, Any] = field(default_factory=dict)  # keyword arguments of gym.make (EnvConfig fields)
    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0: every interface)
    port: int = 8000  # TCP port
    max_sessions: int = 64  # most concurrent sessions; one more is refused with a capacity error
    batch_window_ms: float = 20.0  # longest wait of a step for the steps of other sessions to share its batch


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(version_base=None, config_path=CONF_DIR, config_name="serve_env")
    def _main(raw: Any) -> None:
        merged = OmegaConf.merge(OmegaConf.structured(ServeConfig), raw)
        cfg: ServeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
        import uvicorn

        from dialogue_gym.conversation import DialogueError
        from dialogue_gym.integrations.openenv import create_app
        from dialogue_gym.models import ModelNotFoundError

        try:
            app = create_app(cfg.env, max_sessions=cfg.max_sessions, batch_window_s=cfg.batch_window_ms / 1000)
        except (DialogueError, ModelNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"dialogue-gym OpenEnv server on http://{cfg.host}:{cfg.port} (max {cfg.max_sessions} sessions)",
              flush=True)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")

    _main()


if __name__ == "__main__":
    main()

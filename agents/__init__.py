"""Policies, learning algorithms and the trained-gazer front-end (:class:`Gazer`, imported lazily)."""

__all__ = ["GazeResult", "Gazer"]


def __getattr__(name: str):
    if name in __all__:
        from agents import gazer

        return getattr(gazer, name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")

"""Checkpointed state declared once: a method lists its state attributes in ``_state_slots``."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


class _StateSlots:
    """``get_extra_state``/``set_extra_state``/``_clear_slots`` for the attributes named in
    ``_state_slots`` (tensors are copied, so a checkpoint never aliases the live state).

    A slot's initial value (``None`` or ``0``) is given in ``_state_slots``' mapping.
    """

    _state_slots: ClassVar[dict[str, Any]] = {}

    def _clear_slots(self) -> None:
        for name, initial in self._state_slots.items():
            setattr(self, name, initial)

    def get_extra_state(self) -> dict[str, Any]:
        return {name: _copy(getattr(self, name)) for name in self._state_slots}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for name in self._state_slots:
            setattr(self, name, _copy(state[name]))

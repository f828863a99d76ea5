"""Tools for checking layers: ``gradcheck`` compares a hand-written backward with finite differences."""
from .gradcheck import GradcheckError, gradcheck

__all__ = ["gradcheck", "GradcheckError"]

"""Client-level differential privacy on the server: clipping, noise, the accountant."""

from fedpipe.common.privacy.accountant import PrivacyAccountant, RoundEvent
from fedpipe.server.privacy.client_level import BudgetSpent, ClientLevelDP

__all__ = ["BudgetSpent", "ClientLevelDP", "PrivacyAccountant", "RoundEvent"]

"""esa: Extreme Sensitivity Analysis."""

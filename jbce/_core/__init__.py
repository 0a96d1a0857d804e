"""What every loss family shares: argument checks, the dtype policy, reductions, the
custom-derivative helpers, mesh-axis bookkeeping and small arithmetic."""

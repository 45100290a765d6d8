"""Running where the model does not fit: memory budgets, the routed-expert LRU cache, placement."""

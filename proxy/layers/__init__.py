"""The isolation layers, one package each: its stages, hooks, reload behaviour and backend Protocol."""

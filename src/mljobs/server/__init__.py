"""The control plane: REST API, store, scheduler, monitor."""

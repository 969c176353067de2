"""The SDK. Talks to the control plane over HTTP only."""

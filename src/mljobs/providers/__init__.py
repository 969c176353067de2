"""Where instances run. The server reaches providers only through :mod:`mljobs.providers.base`."""

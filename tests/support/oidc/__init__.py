"""The loopback OpenID provider: a node wrapper around oidc-provider (server.mjs) and its Python handle."""

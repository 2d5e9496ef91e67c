"""The embedded local stack: a real Envoy with the kvab filter, local proxy arms, and helpers
to drive and read them. Used by `make demo` and by the end-to-end tests."""

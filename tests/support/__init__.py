"""What many test modules need, written once.

- net: `ip()`, `net()`, `key()` from text; `free_port()` on loopback.
- config: the test keys and `base_config()` / `make_config()` builders.
- polling: `wait_until()`, the one bounded polling loop.
- resources: `require()`, skip locally / fail under CI=true when a real resource is missing.
- clock: a fake clock (see that module).

tests/conftest.py holds the shared fixtures; tests/serverproc.py the real `knocker serve`
harness.
"""

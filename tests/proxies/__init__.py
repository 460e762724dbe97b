"""Harness for the reverse-proxy end-to-end tests (tests/test_e2e_proxies.py).

configs  -- runnable Caddy/nginx/HAProxy configs generated from deploy/ files
process  -- start a real proxy in the foreground on loopback, stop it by PID
client   -- HTTP requests from chosen loopback source addresses (distinct clients)
upstream -- the trivial protected service, recording what reached it
"""

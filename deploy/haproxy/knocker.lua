-- knocker.lua: HAProxy (2.6+) action that asks Knocker whether a request may pass.
--
-- HAProxy has no auth-subrequest directive (nginx's auth_request, Caddy's
-- forward_auth), so this action does the subrequest itself with HAProxy's own
-- non-blocking HTTP client (core.httpclient(), HAProxy >= 2.5) and leaves the
-- answer in a transaction variable for the configuration to act on:
--
--   global
--       lua-load /etc/haproxy/knocker.lua
--   frontend www
--       http-request lua.knocker_verify http://127.0.0.1:8000/verify
--       http-request deny deny_status 503 if { var(txn.knocker_status) -m int 0 500:599 }
--       http-request deny deny_status 401 unless { var(txn.knocker_status) -m int 200:299 }
--
-- txn.knocker_status holds Knocker's HTTP status, or 0 when the Lua side failed.
-- When Knocker is down or times out, HAProxy's HTTP client itself answers 503
-- (after its connect retries), so 0 and 5xx both mean "could not ask Knocker".
-- Anything but 2xx must be denied: the action only informs, the deny rules are
-- what fail closed.
--
-- What Knocker reads (and nothing else): X-Forwarded-For, X-Forwarded-Host and
-- X-Forwarded-Uri. All three are built here from the connection and the request
-- line, never copied from client-sent X-Forwarded-* headers, so a client cannot
-- choose the address, host or path Knocker decides on. Knocker must list the
-- address HAProxy connects from in server.trusted_proxies, and nothing wider.

-- Milliseconds HAProxy waits for Knocker's answer. Keep it below
-- tune.lua.session-timeout (4 s by default) so that a slow Knocker ends in a
-- 5xx status (deny 503) rather than in an aborted action; an aborted action
-- leaves the variable unset, which the 401 rule denies as well.
local VERIFY_TIMEOUT_MS = 2000

-- Every value of the Host header, in order. A client that sends Host twice gets
-- both values joined with ", ": Knocker treats a comma-separated host as no host
-- at all, so host-scoped exclusions fail closed instead of picking one value.
local function request_host(txn)
    local headers = txn.http:req_get_headers()
    local values = headers["host"]
    if values == nil then
        return nil
    end
    local parts = {}
    -- HAProxy indexes header values from 0.
    local i = 0
    while values[i] ~= nil do
        parts[#parts + 1] = values[i]
        i = i + 1
    end
    if #parts == 0 then
        return nil
    end
    return table.concat(parts, ", ")
end

local function knocker_verify(txn, verify_url)
    local forwarded = {
        -- src is the TCP peer of this connection: the real client, whatever
        -- X-Forwarded-For it sent (if HAProxy itself sits behind another proxy,
        -- see the README before changing this).
        ["x-forwarded-for"] = { txn.sf:src() },
        -- pathq is the path and query exactly as the client sent them. Knocker
        -- normalises the path itself (fail-closed), so it must see the raw form
        -- the upstream will see, not a decoded one.
        ["x-forwarded-uri"] = { txn.sf:pathq() },
    }
    local host = request_host(txn)
    if host ~= nil then
        forwarded["x-forwarded-host"] = { host }
    end

    local status = 0
    -- pcall: an error inside the HTTP client (e.g. an unparsable URL) must end
    -- in a deny, not in an aborted action whose variable is simply unset.
    local ok, response = pcall(function()
        local client = core.httpclient()
        return client:head({
            url = verify_url,
            headers = forwarded,
            timeout = VERIFY_TIMEOUT_MS,
        })
    end)
    if ok and response ~= nil and tonumber(response.status) ~= nil then
        status = tonumber(response.status)
    else
        txn:Warning("knocker: verify request failed: " .. tostring(response))
    end
    txn:set_var("txn.knocker_status", status)
end

-- One argument: the full URL of Knocker's /verify endpoint.
core.register_action("knocker_verify", { "http-req" }, knocker_verify, 1)

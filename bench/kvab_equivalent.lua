-- Bench variant (e): kvab's default-config request work written as an Envoy Lua filter, the
-- widely used alternative to a Wasm filter. Same behaviour for the bench traffic:
--   * every occurrence of x-kv-backend, each split on commas, trimmed of spaces and tabs,
--     matched case-insensitively against the arms and their aliases
--     (p2p, nccl -> nvlink; filesystem, file -> fs);
--   * one arm: x-kv-backend set to it (all occurrences replaced) and x-kv-backend-source set to
--     header / alias; missing or blank: untagged (passthrough), the header removed if present;
--     unknown or several arms: 400 with kvab's OpenAI-shaped JSON body;
--   * x-kv-backend-source and x-kv-backend-endpoint sent by the client are removed;
--   * the response carries x-kv-backend (the arm); x-kv-backend-endpoint comes from the route's
--     response_headers_to_add (%UPSTREAM_REMOTE_ADDRESS%), as Lua cannot read the upstream host.
-- Counting: Envoy's Lua API has no stats (no counters, no histograms). The arm and source are
-- written to dynamic metadata (namespace "kvab"), the per-request record an access log or a
-- metadata-aware stats sink would count from; nothing appears in /stats. That is the part of
-- kvab's work this variant cannot do.

local ARMS = { nvlink = { "nvlink", "header" }, fs = { "fs", "header" },
               p2p = { "nvlink", "alias" }, nccl = { "nvlink", "alias" },
               filesystem = { "fs", "alias" }, file = { "fs", "alias" } }

local REJECT = {
  unknown_kv_backend = '{"error":{"message":"x-kv-backend must name one KV backend: nvlink (aliases: p2p, '
    .. 'nccl); fs (aliases: filesystem, file)","type":"invalid_request_error","code":"unknown_kv_backend",'
    .. '"param":"x-kv-backend"}}',
  ambiguous_kv_backend = '{"error":{"message":"x-kv-backend names more than one KV backend; send exactly one '
    .. 'of: nvlink, fs","type":"invalid_request_error","code":"ambiguous_kv_backend","param":"x-kv-backend"}}',
}

local function reject(handle, code)
  handle:respond({ [":status"] = "400", ["content-type"] = "application/json" }, REJECT[code])
end

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove("x-kv-backend-source")
  headers:remove("x-kv-backend-endpoint")
  local n = headers:getNumValues("x-kv-backend")
  if n == 0 then
    return
  end
  local arm, source, bad = nil, nil, nil
  for i = 0, n - 1 do
    for element in string.gmatch(headers:getAtIndex("x-kv-backend", i), "[^,]+") do
      local name = string.lower(string.match(element, "^[ \t]*(.-)[ \t]*$"))
      if name ~= "" then
        local hit = ARMS[name]
        if hit == nil then
          if arm ~= nil then bad = "ambiguous_kv_backend" else bad = bad or "unknown_kv_backend" end
        elseif bad ~= nil or (arm ~= nil and arm ~= hit[1]) then
          bad = "ambiguous_kv_backend"
        else
          arm = hit[1]
          if source ~= "alias" then source = hit[2] end
        end
      end
    end
  end
  if bad ~= nil then
    reject(handle, bad)
    return
  end
  if arm == nil then
    headers:remove("x-kv-backend")
    return
  end
  headers:replace("x-kv-backend", arm) -- replaces every occurrence (tested)
  headers:replace("x-kv-backend-source", source)
  local metadata = handle:streamInfo():dynamicMetadata()
  metadata:set("kvab", "arm", arm)
  metadata:set("kvab", "source", source)
end

function envoy_on_response(handle)
  local tags = handle:streamInfo():dynamicMetadata():get("kvab")
  if tags ~= nil then
    handle:headers():replace("x-kv-backend", tags["arm"])
  end
end

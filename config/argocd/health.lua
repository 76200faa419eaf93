-- Argo CD health check for byok.dev/ProviderKey (see docs/gitops.md).
-- Argo CD runs it with the live object in `obj`; it returns `hs` with `status` and `message`.
--
--   deletion in progress                       Progressing  the finalizer is removing the managed Secret
--   no status, status.observedGeneration       Progressing  waiting for the controller
--     behind metadata.generation, no Ready
--   Ready=True, Valid                          Healthy      (Verified=Unknown while a newer key's check
--                                                           is retried with backoff is still Healthy)
--   Ready=True, PendingKeyRejected             Degraded     the last good key serves, a newer one was refused
--   Ready=True, Verified=False                 Degraded     the key in service serves, its source is unusable
--   Ready=False, Pending, RateLimited,         Progressing  the operator retries by itself
--     ProviderUnavailable
--   Ready=False, DestinationChanged or         Progressing  while Verified=Unknown: the source key's
--     DecryptionFailed                                      verification is still pending or retried
--   Ready=False, any other reason              Degraded     a person has to act (InvalidKey,
--                                                           SecretNotFound, KeyringUnavailable, ...)
--   Ready=Unknown                              Progressing
--
-- config/argocd/argocd-cm-patch.yaml carries a byte-identical copy (e2e/tests/argocd.rs checks
-- both). Argo CD's Lua is 5.1 (gopher-lua): no goto, no integer division, no utf8 library.

hs = {}

local function find(conditions, wanted)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function describe(c)
  local text = c.reason or ""
  if c.message ~= nil and c.message ~= "" then
    if text ~= "" then
      text = text .. ": "
    end
    text = text .. c.message
  end
  return text
end

-- Ready=False reasons the operator gets past by itself: nothing to do but wait.
local retrying = { Pending = true, RateLimited = true, ProviderUnavailable = true }
-- Ready=False reasons that wait on a verification of the source key: while that one is
-- pending or retried (Verified=Unknown), the operator is still at work.
local awaiting_source = { DestinationChanged = true, DecryptionFailed = true }

local metadata = obj.metadata or {}
local status = obj.status

if metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "being deleted: the operator removes the managed Secret, then its finalizer"
  return hs
end

if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the controller: no status yet"
  return hs
end

if metadata.generation ~= nil and status.observedGeneration < metadata.generation then
  hs.status = "Progressing"
  hs.message = "waiting for the controller: generation " .. tostring(metadata.generation)
    .. " not observed yet (status is for generation " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local ready = find(status.conditions, "Ready")
local verified = find(status.conditions, "Verified")

if ready == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the controller: no Ready condition yet"
  return hs
end

if ready.status == "True" then
  if ready.reason == "PendingKeyRejected" then
    hs.status = "Degraded"
    hs.message = describe(ready)
    if verified ~= nil then
      hs.message = hs.message .. "; Verified " .. describe(verified)
    end
  elseif verified ~= nil and verified.status == "False" then
    hs.status = "Degraded"
    hs.message = describe(ready) .. "; but Verified " .. describe(verified)
  else
    hs.status = "Healthy"
    hs.message = describe(ready)
    if verified ~= nil and verified.status == "Unknown" then
      hs.message = hs.message .. "; Verified " .. describe(verified)
    end
  end
  return hs
end

if ready.status == "False" then
  if retrying[ready.reason] then
    hs.status = "Progressing"
  elseif awaiting_source[ready.reason] and verified ~= nil and verified.status == "Unknown" then
    hs.status = "Progressing"
  else
    hs.status = "Degraded"
  end
  hs.message = describe(ready)
  return hs
end

hs.status = "Progressing"
hs.message = "Ready is " .. tostring(ready.status) .. ": " .. describe(ready)
return hs

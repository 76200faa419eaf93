-- Runs the Argo CD health check (health.lua, next to this file) without Argo CD.
--
--   kubectl get providerkey team-anthropic -o json | lua5.4 config/argocd/run_health.lua
--
-- Reads one ProviderKey as JSON on stdin and prints "<status>\t<message>". An optional
-- argument names another health script. The check runs with only what Argo CD's Lua offers
-- it (`obj` and the base, string, table and math functions), so a script that passes here
-- does not lean on anything Argo CD lacks. Works with Lua 5.1 to 5.4; no JSON library needed.

local function decode(text)
  local pos = 1
  local function fail(what)
    error(string.format("invalid JSON at byte %d: %s", pos, what), 0)
  end
  local function skip()
    pos = string.find(text, "[^ \t\r\n]", pos) or (#text + 1)
  end
  local function peek()
    return string.sub(text, pos, pos)
  end
  local function utf8_char(cp)
    if cp < 0x80 then
      return string.char(cp)
    elseif cp < 0x800 then
      return string.char(0xC0 + math.floor(cp / 0x40), 0x80 + cp % 0x40)
    elseif cp < 0x10000 then
      return string.char(0xE0 + math.floor(cp / 0x1000), 0x80 + math.floor(cp / 0x40) % 0x40,
        0x80 + cp % 0x40)
    end
    return string.char(0xF0 + math.floor(cp / 0x40000), 0x80 + math.floor(cp / 0x1000) % 0x40,
      0x80 + math.floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
  end
  local function hex4()
    local digits = string.sub(text, pos, pos + 3)
    if not string.find(digits, "^%x%x%x%x$") then
      fail("bad \\u escape")
    end
    pos = pos + 4
    return tonumber(digits, 16)
  end
  local escapes = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n",
    r = "\r", t = "\t" }
  local function str()
    pos = pos + 1
    local parts = {}
    while true do
      local stop = string.find(text, '["\\]', pos)
      if stop == nil then
        fail("unterminated string")
      end
      parts[#parts + 1] = string.sub(text, pos, stop - 1)
      pos = stop + 1
      if string.sub(text, stop, stop) == '"' then
        return table.concat(parts)
      end
      local e = peek()
      pos = pos + 1
      if e == "u" then
        local cp = hex4()
        if cp >= 0xD800 and cp <= 0xDBFF then
          if string.sub(text, pos, pos + 1) ~= "\\u" then
            fail("lone surrogate")
          end
          pos = pos + 2
          local low = hex4()
          if low < 0xDC00 or low > 0xDFFF then
            fail("bad surrogate pair")
          end
          cp = 0x10000 + (cp - 0xD800) * 0x400 + (low - 0xDC00)
        end
        parts[#parts + 1] = utf8_char(cp)
      elseif escapes[e] ~= nil then
        parts[#parts + 1] = escapes[e]
      else
        fail("bad escape \\" .. e)
      end
    end
  end
  local value
  local function list()
    pos = pos + 1
    local result, n = {}, 0
    skip()
    if peek() == "]" then
      pos = pos + 1
      return result
    end
    while true do
      n = n + 1
      result[n] = value()
      skip()
      local c = peek()
      pos = pos + 1
      if c == "]" then
        return result
      elseif c ~= "," then
        fail("expected ',' or ']'")
      end
    end
  end
  local function object()
    pos = pos + 1
    local result = {}
    skip()
    if peek() == "}" then
      pos = pos + 1
      return result
    end
    while true do
      skip()
      if peek() ~= '"' then
        fail("expected a member name")
      end
      local name = str()
      skip()
      if peek() ~= ":" then
        fail("expected ':'")
      end
      pos = pos + 1
      result[name] = value()
      skip()
      local c = peek()
      pos = pos + 1
      if c == "}" then
        return result
      elseif c ~= "," then
        fail("expected ',' or '}'")
      end
    end
  end
  local literals = { ["true"] = true, ["false"] = false }
  value = function()
    skip()
    local c = peek()
    if c == "{" then
      return object()
    elseif c == "[" then
      return list()
    elseif c == '"' then
      return str()
    end
    for word, v in pairs(literals) do
      if string.sub(text, pos, pos + #word - 1) == word then
        pos = pos + #word
        return v
      end
    end
    if string.sub(text, pos, pos + 3) == "null" then
      pos = pos + 4
      return nil
    end
    local number = string.match(text, "^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
    if number == nil or tonumber(number) == nil then
      fail("unexpected " .. (c == "" and "end of input" or "'" .. c .. "'"))
    end
    pos = pos + #number
    return tonumber(number)
  end
  local result = value()
  skip()
  if pos <= #text then
    fail("trailing data")
  end
  return result
end

local function main()
  local here = string.match(arg and arg[0] or "", "^(.*[/\\])") or "./"
  local script = (arg and arg[1]) or (here .. "health.lua")
  local obj = decode(io.read("*a"))
  if type(obj) ~= "table" then
    error("stdin is not a JSON object", 0)
  end
  local env = {
    obj = obj,
    ipairs = ipairs, pairs = pairs, next = next, select = select, type = type,
    tostring = tostring, tonumber = tonumber, error = error, pcall = pcall,
    string = string, table = table, math = math,
  }
  local chunk, err
  if setfenv ~= nil then
    chunk, err = loadfile(script)
    if chunk ~= nil then
      setfenv(chunk, env)
    end
  else
    chunk, err = loadfile(script, "t", env)
  end
  if chunk == nil then
    error(err, 0)
  end
  local hs = chunk()
  if type(hs) ~= "table" or type(hs.status) ~= "string" then
    error(script .. " returned no hs.status", 0)
  end
  io.write(hs.status, "\t", tostring(hs.message or ""), "\n")
end

local ok, err = pcall(main)
if not ok then
  io.stderr:write("run_health.lua: ", tostring(err), "\n")
  os.exit(1)
end

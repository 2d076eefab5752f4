package main

// The inputs every fixture template is rendered with, and the interpreter's corner cases.

type scenario struct {
	name  string
	input string // ollamaInput as JSON: messages and tools exactly as a client sends them
}

const weatherTools = `[
  {"type": "function", "function": {
    "name": "get_weather",
    "description": "Get the <current> weather & more \u2028 for a \"city\"",
    "parameters": {
      "type": "object",
      "required": ["city"],
      "additionalProperties": false,
      "$defs": {"b": {"type": "string"}, "a": 1},
      "properties": {
        "city": {"type": "string", "description": "City name, e.g. Zürich"},
        "unit": {"type": ["string", "null"], "enum": ["c", "f", 3], "default": "c"},
        "days": {"type": "integer", "minimum": 1},
        "when": {"anyOf": [{"type": "string"}, {"type": "number"}]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}},
        "where": {"type": "object", "required": ["lat", "lon"],
          "properties": {"lon": {"type": "number"}, "lat": {"type": "number", "description": "<deg>"}}},
        "flag": {"type": null}
      }
    }
  }},
  {"type": "function", "function": {"name": "noop"}},
  {"Type": "function", "items": {"z": 1, "a": [true, null]}, "FUNCTION": {"Name": "shout", "parameters": {"type": "object", "properties": {}}}}
]`

const toolConversation = `[
  {"role": "system", "content": "You can call tools."},
  {"role": "user", "content": "Weather in Zürich & Paris?"},
  {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_1", "function": {"index": 0, "name": "get_weather",
      "arguments": {"unit": "c", "city": "Zürich <CH> & co", "days": 3, "big": 12345678901234567890,
        "ratio": 1.5, "huge": 1e21, "tiny": 1e-7, "nested": {"z": [1, 2.5, "x"], "a": null}, "ok": true, "sep": "\u2028"}}},
    {"function": {"index": 1, "name": "noop"}},
    {"id": "call_3", "function": {"name": "shout", "arguments": null}}
  ]},
  {"role": "tool", "content": "{\"temp\": 21}", "tool_name": "get_weather", "tool_call_id": "call_1"},
  {"role": "tool", "content": "done"},
  {"role": "user", "content": "Thanks!"}
]`

var scenarios = []scenario{
	{"user", `{"messages": [{"role": "user", "content": "Hello, how are you?"}]}`},
	{"user-assistant-user", `{"messages": [
		{"role": "user", "content": "Hello, how are you?"},
		{"role": "assistant", "content": "I'm doing great. How can I help you today?"},
		{"role": "user", "content": "I'd like to show off how chat templating works!"}]}`},
	{"system-user-assistant-user", `{"messages": [
		{"role": "system", "content": "You are a helpful assistant."},
		{"role": "user", "content": "Hello, how are you?"},
		{"role": "assistant", "content": "I'm doing great. How can I help you today?"},
		{"role": "user", "content": "I'd like to show off how chat templating works!"}]}`},
	{"no-messages", `{"messages": []}`},
	{"hostile-text", `{"messages": [
		{"role": "system", "content": "Be <b>bold</b> & \"exact\" \u2028 and \u2029"},
		{"role": "system", "content": "A second system message."},
		{"role": "USER", "content": "héllo 日本語 🙂 {{ .System }} <|eot_id|> \ud800 tab\tend"},
		{"role": "user", "content": "a second user turn"},
		{"role": "assistant", "content": ""},
		{"role": "user", "content": "   "},
		{"role": "developer", "content": "a developer note"},
		{"role": "user", "content": ""}]}`},
	{"system-in-the-middle", `{"messages": [
		{"role": "user", "content": "first"},
		{"role": "system", "content": "late system"},
		{"role": "user", "content": "second"}]}`},
	{"assistant-last", `{"messages": [
		{"role": "user", "content": "Complete: The sky is"},
		{"role": "assistant", "content": " blue"}]}`},
	{"tools", `{"tools": ` + weatherTools + `, "messages": [{"role": "user", "content": "What's the weather?"}]}`},
	{"tools-empty", `{"tools": [], "messages": [{"role": "user", "content": "No tools here."}]}`},
	{"tool-calls", `{"tools": ` + weatherTools + `, "messages": ` + toolConversation + `}`},
	{"tool-calls-without-tools", `{"messages": ` + toolConversation + `}`},
	{"tool-call-last", `{"tools": ` + weatherTools + `, "messages": [
		{"role": "user", "content": "Call it"},
		{"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}]}`},
	{"thinking", `{"think": true, "think_level": "medium", "is_think_set": true, "messages": [
		{"role": "user", "content": "Why is the sky blue?"},
		{"role": "assistant", "thinking": "Rayleigh <scattering> & co.", "content": "Because of scattering."},
		{"role": "user", "content": "And sunsets?"}]}`},
	{"thinking-last", `{"think": true, "think_level": "high", "is_think_set": true, "messages": [
		{"role": "user", "content": "Why is the sky blue?"},
		{"role": "assistant", "thinking": "Let me think about this step by step."}]}`},
	{"no-think", `{"think": false, "is_think_set": true, "messages": [
		{"role": "user", "content": "Quick answer please."},
		{"role": "assistant", "thinking": "hidden", "content": "Sure."},
		{"role": "user", "content": "Thanks"}]}`},
	{"images", `{"messages": [
		{"role": "user", "content": "[img-0]What is this?", "images": ["aGVsbG8="]},
		{"role": "user", "content": "And this one?", "images": ["d29ybGQ=", "IQ=="]},
		{"role": "assistant", "content": "Two greetings."}]}`},
	{"prompt-suffix", `{"prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))"}`},
}

// legacyTemplates use .System/.Prompt/.Response and so take Execute's per-turn path.
var legacyTemplates = map[string]string{
	"legacy-chatml":           "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
	"legacy-default":          "{{ .Prompt }}",
	"legacy-response-in-if":   "{{ .Prompt }}{{ if .Response }}[{{ .Response }}]{{ else }}-{{ end }}",
	"legacy-response-in-list": "{{ .Prompt }}{{ if .Prompt }}<{{ .Response }}>{{ end }} tail {{ .System }}",
	"legacy-funcs":            "{{ json .Prompt }} {{ .Response }}",
	"legacy-missing":          "{{ .Prompt }}|{{ .Nope }}|{{ .Response }}|{{ .Nope.Deeper }}",
	"legacy-think":            "{{ if .Think }}T{{ end }}{{ .ThinkLevel }}{{ .System }}:{{ .Prompt }}={{ .Response }}",
}

type generic struct {
	name     string
	template string
	data     string // the template's data, as JSON (decoded into interface{})
}

var generics = []generic{
	{"text-only", "plain text, no actions\n", `{}`},
	{"trim-markers", "a  \n {{- .x -}} \n  b {{- \" c \" }} d {{ \"e\" -}}  \n f{{- /* gone */ -}}  g {{/* kept space */}} h", `{"x": "X"}`},
	{"comments", "1{{/* a */}}2{{- /* b */}}3{{/* c */ -}} 4", `{}`},
	{"truthiness", `{{ range $k, $v := . }}{{ $k }}={{ if $v }}T{{ else }}F{{ end }};{{ end }}`,
		`{"a": "", "b": "x", "c": 0, "d": 0.5, "e": null, "f": [], "g": [0], "h": {}, "i": {"k": 1}, "j": false, "k": true}`},
	{"else-if-chain", `{{ range .l }}{{ if eq . 1.0 }}one{{ else if eq . 2.0 }}two{{ else if gt . 2.0 }}many{{ else }}few{{ end }},{{ end }}`, `{"l": [0, 1, 2, 3]}`},
	{"range-index-value", `{{ range $i, $v := .l }}{{ $i }}:{{ $v }} {{ end }}|{{ range .l }}[{{ . }}]{{ end }}`, `{"l": ["a", "b", 3, null, true]}`},
	{"range-map-sorted", `{{ range $k, $v := .m }}{{ $k }}={{ $v }} {{ end }}`, `{"m": {"b": 2, "a": 1, "C": 3, "aa": 0, "é": 5}}`},
	{"range-else", `{{ range .empty }}x{{ else }}none{{ end }} {{ range .missing }}x{{ else }}no key{{ end }}`, `{"empty": []}`},
	{"range-break-continue", `{{ range $i, $v := .l }}{{ if eq $v "skip" }}{{ continue }}{{ end }}{{ if eq $v "stop" }}{{ break }}{{ end }}{{ $v }}{{ end }}`, `{"l": ["a", "skip", "b", "stop", "c"]}`},
	{"nested-range-dollar", `{{ range $i, $row := .rows }}{{ range $row }}{{ $.sep }}{{ . }}{{ end }}{{ $i }}{{ end }}`, `{"rows": [["a", "b"], ["c"]], "sep": "/"}`},
	{"with", `{{ with .a }}[{{ .b }}]{{ else }}no a{{ end }} {{ with .z }}z{{ else }}no z{{ end }} {{ with $x := .a.b }}{{ $x }}{{ end }}`, `{"a": {"b": "B"}}`},
	{"variables-scope", `{{ $x := "outer" }}{{ if true }}{{ $x := "inner" }}{{ $x }}{{ end }} {{ $x }} {{ range .l }}{{ $x = . }}{{ end }}{{ $x }}`, `{"l": ["p", "q"]}`},
	{"last-user-index", `{{- $last := -1 -}}{{ range $i, $m := .msgs }}{{ if eq $m.role "user" }}{{ $last = $i }}{{ end }}{{ end }}{{ $last }}`,
		`{"msgs": [{"role": "user"}, {"role": "assistant"}, {"role": "user"}, {"role": "tool"}]}`},
	{"pipelines", `{{ .s | printf "%s!" }} {{ "abc" | len }} {{ (len .l) | printf "%d items" }} {{ .s | printf "%s-%s" "x" }}`, `{"s": "hi", "l": [1, 2, 3]}`},
	{"and-or-values", `{{ and 1 "x" }} {{ and 0 "x" }} {{ or "" 0 "z" }} {{ or "" 0 }} {{ and .missing "x" }} {{ not .missing }} {{ not 1 }} {{ or .a .b }}`, `{"a": null, "b": [1]}`},
	{"comparisons", `{{ eq "a" "a" }} {{ eq 1 1 }} {{ eq .f 1.5 }} {{ eq "x" "y" "x" }} {{ ne "a" "b" }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt "b" "a" }} {{ ge 1.5 .f }} {{ lt "Z" "a" }} {{ eq .missing "x" }}`, `{"f": 1.5}`},
	{"compare-incompatible", `{{ eq .f 1 }}`, `{"f": 1}`},
	{"compare-invalid-type", `{{ lt .l 1 }}`, `{"l": [1]}`},
	{"len", `{{ len "héllo" }} {{ len .l }} {{ len .m }} {{ len "" }}`, `{"l": [1, 2], "m": {"a": 1}}`},
	{"len-of-nil", `{{ len .missing }}`, `{}`},
	{"index", `{{ index .l 1 }} {{ index .m "k" }} {{ index .m "nope" }} {{ index .nested 0 "a" 1 }} {{ index "abc" 1 }}`, `{"l": ["x", "y"], "m": {"k": "v"}, "nested": [{"a": [10, 20]}]}`},
	{"index-out-of-range", `{{ index .l 5 }}`, `{"l": [1]}`},
	{"slice", `{{ slice .l 1 }} {{ slice .l 0 1 }} {{ slice "héllo" 0 1 }} {{ slice "abc" 1 2 }} {{ len (slice .l 2) }}`, `{"l": [1, 2, 3]}`},
	{"print-values", `{{ .f1 }} {{ .f2 }} {{ .f3 }} {{ .f4 }} {{ .f5 }} {{ .f6 }} {{ .b }} {{ .n }} {{ .l }} {{ .m }} {{ .s }} {{ .missing }} {{ . }}`,
		`{"f1": 1000000, "f2": 100000, "f3": 0.1, "f4": 1e21, "f5": 1.5e-7, "f6": -2.25, "b": true, "n": null, "l": [1, "a", null, [2]], "m": {"z": 1, "a": {"b": null}}, "s": "<&> \u2028"}`},
	{"print-funcs", `{{ print "a" 1 2 "b" .n }}|{{ println 1 "x" }}|{{ print }}|{{ print .m }}`, `{"n": null, "m": {"k": [1, 2]}}`},
	{"printf-verbs", `{{ printf "%s|%d|%v|%q|%t|%x|%X|%c|%U|%5s|%-5s|%05d|%.2f|%e|%g|%8.3f|%+d|%o|%%" "s" 42 .l "q\"\n" true 255 "hi" 65 9731 "ab" "cd" 42 3.14159 1234.5678 0.000012 2.5 7 8 }}`, `{"l": [1, 2]}`},
	{"printf-bad", `{{ printf "%d %s %d" "x" 3 }}|{{ printf "%s" }}|{{ printf "x" 1 "y" }}|{{ printf "%v %v" .missing .n }}|{{ printf "%z" 1 }}`, `{"n": null}`},
	{"printf-floats", `{{ printf "%v %v %v %v %.3g %g %G %.0f %.1e" .a .b .c .d .e .f .g .h .i }}`, `{"a": 123456789, "b": 0.0001, "c": 0.00001, "d": 1e100, "e": 3.14159, "f": 1e-10, "g": 2.5e30, "h": 2.5, "i": 0.15}`},
	{"json-func", `{{ json .s }} {{ json .m }} {{ json .l }} {{ json .missing }} {{ json 1 }} {{ json "x" }} {{ json .f }}`, `{"s": "<a href=\"x\">&amp;</a> \u2028", "m": {"b": 1, "a": [true, null]}, "l": [], "f": 1e21}`},
	{"dates", `{{ currentDate }} {{ yesterdayDate }} {{ currentDate "2006" }}`, `{}`},
	{"typescript-any", `{{ toTypeScriptType .x }} {{ toTypeScriptType "s" }}`, `{"x": {"type": "string"}}`},
	{"missing-keys", `[{{ .a }}] [{{ .a.b }}] [{{ $.a.b }}] [{{ .m.missing }}] [{{ index .m "missing" }}]`, `{"a": {}, "m": {}}`},
	{"missing-chain", `{{ .missing.deeper }}`, `{}`},
	{"missing-variable-field", `{{ $x := .missing }}[{{ $x }}][{{ $x.deeper }}]`, `{}`},
	{"field-of-string", `{{ .s.x }}`, `{"s": "str"}`},
	{"field-of-number", "line one\n{{ .n.x }}", `{"n": 1}`},
	{"nil-command", `{{ nil }}`, `{}`},
	{"undefined-function", `{{ foo 1 }}`, `{}`},
	{"undefined-variable", `{{ $nope }}`, `{}`},
	{"unclosed-action", `{{ .x `, `{}`},
	{"missing-end", `{{ if .x }}open`, `{}`},
	{"unexpected-end", `{{ end }}`, `{}`},
	{"wrong-arg-count", `{{ len 1 2 }}`, `{}`},
	{"not-a-function", `{{ "x" 1 }}`, `{}`},
	{"bad-pipeline-stage", `{{ .x | "y" }}`, `{}`},
	{"break-outside-range", `{{ break }}`, `{}`},
	{"range-over-string", `{{ range .s }}x{{ end }}`, `{"s": "abc"}`},
	{"string-literals", "{{ \"tab\\tquote\\\"nl\\n\\u00e9\\x41\" }}|{{ `raw\\n{{` }}|{{ 'a' }}|{{ 0x1F }}|{{ 1e3 }}|{{ -7 }}|{{ 2.50 }}", `{}`},
	{"chain-of-paren", `{{ (index .l 0).name }} {{ (.m).k }}`, `{"l": [{"name": "first"}], "m": {"k": "v"}}`},
	{"root-list", `{{ range . }}{{ . }};{{ end }}{{ len . }}`, `[1, "two", [3]]`},
	{"dot-in-function", `{{ len . }} {{ index . "k" }}`, `{"k": "v"}`},
	{"whitespace-in-actions", "{{\t.a\n}}|{{  .a  }}|{{- .a\t-}}|", `{"a": "A"}`},
}

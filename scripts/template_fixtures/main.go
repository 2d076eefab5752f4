// Command template_fixtures renders prompt templates with Go's own text/template and writes
// the results as JSON fixtures: the truth tests/unit/test_go_template.py holds the Ollama
// simulator's template interpreter (scripts/ollama_simulator/gotemplate.py and friends) to,
// byte for byte. The fixtures are committed; CI never needs Go.
//
// Regenerate after changing a template, a case below or ollama.go (the stdlib-only port of
// the Ollama code that builds template values), from the repository root:
//
//	apt-get install -y golang-go      # Debian's Go 1.19 is enough; no modules are fetched
//	cd scripts/template_fixtures && go run . ../../tests/fixtures/templates
//
// Two kinds of case are written:
//
//   - "ollama" cases run a request's messages and tools (as the client sends the JSON)
//     through Ollama's Template.Execute: collate, template value conversion, the .Messages
//     path or the legacy per-turn path, over the simulator's model templates
//     (scripts/ollama_simulator/templates) and Ollama's own template/*.gotmpl (the copies in
//     tests/fixtures/ollama_templates, from Ollama v0.33.0-rc2; ollama.go ports fb30760996).
//   - "generic" cases run a template over generic JSON data (map[string]any) with
//     missingkey=zero and Ollama's FuncMap, for the interpreter's corners.
//
// A case whose template does not parse or execute records Go's error message instead.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"text/template"
	"time"
)

// today is the date currentDate renders in every fixture.
var today = time.Date(2026, 8, 21, 17, 0, 0, 0, time.UTC)

type fixtureFile struct {
	Generator string    `json:"generator"`
	Cases     []fixture `json:"cases"`
}

type fixture struct {
	Name     string          `json:"name"`
	Mode     string          `json:"mode"`
	Template string          `json:"template"`
	Today    string          `json:"today"`
	Input    json.RawMessage `json:"input"`
	Output   *string         `json:"output"`
	Error    *string         `json:"error"`
}

// ollamaInput is one request's worth of template values, as JSON.
type ollamaInput struct {
	Messages   json.RawMessage `json:"messages"`
	Tools      json.RawMessage `json:"tools"`
	Prompt     string          `json:"prompt"`
	Suffix     string          `json:"suffix"`
	Think      bool            `json:"think"`
	ThinkLevel string          `json:"think_level"`
	IsThinkSet bool            `json:"is_think_set"`
}

func renderOllama(text string, raw string) (string, error) {
	var in ollamaInput
	if err := json.Unmarshal([]byte(raw), &in); err != nil {
		panic(fmt.Sprintf("bad input %s: %v", raw, err))
	}
	var values Values
	if len(in.Messages) > 0 {
		if err := json.Unmarshal(in.Messages, &values.Messages); err != nil {
			panic(fmt.Sprintf("bad messages %s: %v", in.Messages, err))
		}
	}
	if len(in.Tools) > 0 {
		if err := json.Unmarshal(in.Tools, &values.Tools); err != nil {
			panic(fmt.Sprintf("bad tools %s: %v", in.Tools, err))
		}
	}
	values.Prompt, values.Suffix = in.Prompt, in.Suffix
	values.Think, values.ThinkLevel, values.IsThinkSet = in.Think, in.ThinkLevel, in.IsThinkSet
	tmpl, err := Parse(text, today)
	if err != nil {
		return "", err
	}
	var b bytes.Buffer
	err = tmpl.Execute(&b, values)
	return b.String(), err
}

func renderGeneric(text string, raw string) (string, error) {
	var data any
	if err := json.Unmarshal([]byte(raw), &data); err != nil {
		panic(fmt.Sprintf("bad data %s: %v", raw, err))
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(ollamaFuncs(today)).Parse(text)
	if err != nil {
		return "", err
	}
	var b bytes.Buffer
	err = tmpl.Execute(&b, data)
	return b.String(), err
}

func render(mode, text, input string) (out string, err error) {
	defer func() {
		// Ollama's deleteNode can panic on a legacy template; gin answers 500.
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	if mode == "ollama" {
		return renderOllama(text, input)
	}
	return renderGeneric(text, input)
}

func record(name, mode, text, input string) fixture {
	out, err := render(mode, text, input)
	f := fixture{Name: name, Mode: mode, Template: text, Today: today.Format("2006-01-02"), Input: json.RawMessage(input)}
	if err != nil {
		message := err.Error()
		f.Error = &message
	} else {
		f.Output = &out
	}
	return f
}

func readTemplates(dir string) map[string]string {
	paths, err := filepath.Glob(filepath.Join(dir, "*.gotmpl"))
	if err != nil {
		panic(err)
	}
	out := map[string]string{}
	for _, path := range paths {
		b, err := os.ReadFile(path)
		if err != nil {
			panic(err)
		}
		// template.go normalises line endings of its embedded templates.
		out[strings.TrimSuffix(filepath.Base(path), ".gotmpl")] = strings.ReplaceAll(string(b), "\r\n", "\n")
	}
	return out
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func write(dir, name string, cases []fixture) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(fixtureFile{Generator: "scripts/template_fixtures (" + runtime.Version() + ")", Cases: cases}); err != nil {
		panic(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), b.Bytes(), 0o644); err != nil {
		panic(err)
	}
	fmt.Printf("%s: %d cases\n", name, len(cases))
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: go run . <fixtures directory>")
		os.Exit(2)
	}
	dir := os.Args[1]
	if err := os.MkdirAll(dir, 0o755); err != nil {
		panic(err)
	}

	models := readTemplates(filepath.Join("..", "ollama_simulator", "templates"))
	var modelCases []fixture
	for _, name := range sortedKeys(models) {
		for _, sc := range scenarios {
			modelCases = append(modelCases, record(name+"/"+sc.name, "ollama", models[name], sc.input))
		}
	}
	write(dir, "model_templates.json", modelCases)

	ollama := readTemplates(filepath.Join("..", "..", "tests", "fixtures", "ollama_templates"))
	for name, text := range legacyTemplates {
		ollama[name] = text
	}
	var ollamaCases []fixture
	for _, name := range sortedKeys(ollama) {
		for _, sc := range scenarios {
			ollamaCases = append(ollamaCases, record(name+"/"+sc.name, "ollama", ollama[name], sc.input))
		}
	}
	write(dir, "ollama_templates.json", ollamaCases)

	var genericCases []fixture
	for _, gc := range generics {
		genericCases = append(genericCases, record(gc.name, "generic", gc.template, gc.data))
	}
	write(dir, "interpreter.json", genericCases)
}

// Renders Ollama TEMPLATEs the way Ollama's chat endpoint does, for tests/test_ollama.py.
//
// Reads a JSON array of cases {template, system_default, messages, tools} on stdin and writes a JSON array of
// {prompt} or {error} on stdout. What it reproduces of Ollama (server/routes.go, template/template.go):
//   - the Modelfile SYSTEM is prepended as a system message when the conversation does not start with one;
//   - messages are collated: consecutive messages of one role (tool excepted) are merged with "\n\n", and
//     .System is every system message joined with "\n\n";
//   - the template runs on {System, Messages, Tools, Response: "", Think: false} with missingkey=zero and
//     Ollama's template functions (json, currentDate, yesterdayDate, toTypeScriptType);
//   - tools and tool-call arguments are maps in the template, printed as compact JSON (Go's encoding/json).
// Standard library only: build with `go build -o render main.go`.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"time"
)

type toolProperty struct {
	AnyOf       []toolProperty          `json:"anyOf,omitempty"`
	Type        any                     `json:"type,omitempty"`
	Items       any                     `json:"items,omitempty"`
	Description string                  `json:"description,omitempty"`
	Enum        []any                   `json:"enum,omitempty"`
	Properties  map[string]toolProperty `json:"properties,omitempty"`
	Required    []string                `json:"required,omitempty"`
}

type toolParameters struct {
	Type       string                  `json:"type"`
	Defs       any                     `json:"$defs,omitempty"`
	Items      any                     `json:"items,omitempty"`
	Required   []string                `json:"required,omitempty"`
	Properties map[string]toolProperty `json:"properties"`
}

type toolFunction struct {
	Name        string         `json:"name"`
	Description string         `json:"description"`
	Parameters  toolParameters `json:"parameters"`
}

type tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function toolFunction `json:"function"`
}

func (t tool) String() string { b, _ := json.Marshal(t); return string(b) }

type tools []tool

func (t tools) String() string { b, _ := json.Marshal(t); return string(b) }

type args map[string]any

func (a args) String() string {
	if a == nil {
		return "{}"
	}
	b, _ := json.Marshal(a)
	return string(b)
}

type toolCallFunction struct {
	Index     int
	Name      string
	Arguments args
}

type toolCall struct {
	ID       string
	Function toolCallFunction
}

type message struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []toolCall
	ToolName   string
	ToolCallID string
}

type inputMessage struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	ToolCalls []struct {
		ID       string `json:"id"`
		Function struct {
			Name      string         `json:"name"`
			Arguments map[string]any `json:"arguments"`
		} `json:"function"`
	} `json:"tool_calls"`
}

type testCase struct {
	Template      string         `json:"template"`
	SystemDefault string         `json:"system_default"`
	Messages      []inputMessage `json:"messages"`
	Tools         tools          `json:"tools"`
}

type result struct {
	Prompt string `json:"prompt"`
	Error  string `json:"error,omitempty"`
}

var funcs = template.FuncMap{
	"json": func(v any) string { b, _ := json.Marshal(v); return string(b) },
	"currentDate": func(...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func(...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(any) string { return "any" },
}

func render(c testCase) (string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	msgs := c.Messages
	if c.SystemDefault != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]inputMessage{{Role: "system", Content: c.SystemDefault}}, msgs...)
	}
	var system []string
	var collated []*message
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role && m.Role != "tool" {
			collated[n-1].Content += "\n\n" + m.Content
			continue
		}
		converted := &message{Role: m.Role, Content: m.Content}
		for i, tc := range m.ToolCalls {
			converted.ToolCalls = append(converted.ToolCalls, toolCall{
				ID:       tc.ID,
				Function: toolCallFunction{Index: i, Name: tc.Function.Name, Arguments: args(tc.Function.Arguments)},
			})
		}
		collated = append(collated, converted)
	}
	var b strings.Builder
	err = tmpl.Execute(&b, map[string]any{
		"System":     strings.Join(system, "\n\n"),
		"Messages":   collated,
		"Tools":      c.Tools,
		"Response":   "",
		"Think":      false,
		"ThinkLevel": "",
		"IsThinkSet": false,
	})
	return b.String(), err
}

func main() {
	var cases []testCase
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	results := make([]result, len(cases))
	for i, c := range cases {
		prompt, err := render(c)
		results[i].Prompt = prompt
		if err != nil {
			results[i].Error = err.Error()
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		panic(err)
	}
}

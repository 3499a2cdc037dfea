package store

import (
	"bufio"
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
)

// topLevelKeys lists the keys of one JSON object in order, duplicates included (decoding into a
// map would keep only the last of two equal keys and hide the defect).
func topLevelKeys(t *testing.T, line []byte) []string {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(line))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		t.Fatalf("log line is not a JSON object: %s", line)
	}
	var keys []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			t.Fatalf("decode %s: %v", line, err)
		}
		keys = append(keys, tok.(string))
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			t.Fatalf("decode %s: %v", line, err)
		}
	}
	return keys
}

func TestBadgerLogLinesHaveOneMsgKey(t *testing.T) {
	var buf bytes.Buffer
	l := badgerLogger{l: slog.New(slog.NewJSONHandler(&buf, nil))}
	l.Errorf("compaction failed at level %d\n", 3)
	l.Warningf("value log %s truncated", "000001.vlog")
	l.Infof("ignored")
	l.Debugf("ignored")
	sc := bufio.NewScanner(&buf)
	var lines int
	for sc.Scan() {
		lines++
		line := sc.Bytes()
		n := 0
		for _, k := range topLevelKeys(t, line) {
			if k == "msg" {
				n++
			}
		}
		if n != 1 {
			t.Errorf("log line has %d \"msg\" keys, want 1: %s", n, line)
		}
		var m map[string]any
		if err := json.Unmarshal(line, &m); err != nil {
			t.Fatal(err)
		}
		if m["component"] != "badger" {
			t.Errorf("component = %v, want badger: %s", m["component"], line)
		}
		if msg, _ := m["msg"].(string); !strings.Contains(msg, "level 3") && !strings.Contains(msg, "000001.vlog") ||
			strings.HasSuffix(msg, "\n") {
			t.Errorf("msg %q is not Badger's text, trimmed", msg)
		}
	}
	if lines != 2 {
		t.Fatalf("%d log lines, want 2 (error and warning; info and debug dropped):\n%s", lines, buf.String())
	}
	badgerLogger{}.Errorf("no logger: no panic")
}

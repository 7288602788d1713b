package engine_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/internal/qemutools"
)

// A file: stream the engine wrote from a running guest is parsed by QEMU's
// own scripts/analyze-migration.py, which finds every device.
func TestFileStreamAnalyzedByQEMU(t *testing.T) {
	script, err := qemutools.AnalyzeScript()
	if err != nil {
		t.Skip(err)
	}
	src := newEnd(t, false, guestCfg())
	file := filepath.Join(t.TempDir(), "guest.mig")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	m, err := engine.Start(ctx, src.c, src.g, "file:"+file, engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r, _ := m.Wait(ctx)
	if r.State != "completed" {
		t.Fatalf("save ended %s: %v", r.State, r.Err)
	}
	out, err := exec.CommandContext(ctx, "python3", script, "-f", file).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("analyze-migration.py: %v\n%s", err, stderr)
	}
	var state map[string]any
	if err := json.Unmarshal(out, &state); err != nil {
		t.Fatalf("analyze-migration.py printed no JSON: %v\n%s", err, out)
	}
	for _, want := range []string{"migctl/handshake (0)", "ram (1)", "timer (2)", "serial (3)", "nic (4)"} {
		if _, ok := state[want]; !ok {
			t.Errorf("analyze-migration.py output lacks %q; has %v", want, keys(state))
		}
	}
	_ = os.Remove(file)
}

func keys(m map[string]any) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

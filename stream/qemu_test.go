package stream

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/internal/qemutools"
)

// These tests run QEMU's own scripts/analyze-migration.py on files we write.
// The script comes from Debian's qemu source package, fetched once by
// shared/tools/qemu-src.sh into os.TempDir()/qemu-src-cache. The tools
// folder is $MIGCTL_QEMU_SRC if set (the folder, or the script itself), else
// ../shared/tools beside the module root. Without it, without network or apt,
// or without python3, the tests skip and say why.

// analyzeScript returns the path of analyze-migration.py or skips t.
func analyzeScript(t *testing.T) string {
	t.Helper()
	script, err := qemutools.AnalyzeScript()
	if err != nil {
		t.Skip(err)
	}
	return script
}

// runScript runs the script on b with args and returns stdout, stderr and
// whether it exited 0.
func runScript(t *testing.T, dir string, b []byte, args ...string) (string, string, bool) {
	t.Helper()
	script := analyzeScript(t)
	file := filepath.Join(t.TempDir(), "migration.bin")
	must(t, os.WriteFile(file, b, 0o644))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "python3", append([]string{script, "-f", file}, args...)...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("running analyze-migration.py: %v", err)
		}
	}
	return stdout.String(), stderr.String(), err == nil
}

func hexBytes(b []byte) string {
	parts := make([]string, len(b))
	for i, c := range b {
		parts[i] = hex.EncodeToString([]byte{c})
	}
	return strings.Join(parts, " ")
}

func TestQEMUAnalyzeState(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	writeSample(t, &buf, false)
	out, stderr, ok := runScript(t, t.TempDir(), buf.Bytes())
	if !ok {
		t.Fatalf("analyze-migration.py failed:\n%s", stderr)
	}
	t.Logf("analyze-migration.py -f FILE:\n%s", out)
	var state map[string]map[string]any
	if err := json.Unmarshal([]byte(out), &state); err != nil {
		t.Fatalf("output is not JSON: %v", err)
	}
	want := map[string]map[string]any{
		"ram (1)": {"section sizes": map[string]any{
			"pc.ram": fmt.Sprintf("0x%016x", ramSize),
			romName:  fmt.Sprintf("0x%016x", romSize),
		}},
		"timer (2)":                   {"size": "0x00000008", "data": "01 02 03 04 05 06 07 08"},
		"0000:00:02.0/virtio-net (3)": {"size": "0x00000190", "data": hexBytes(bytes.Repeat([]byte("net!"), 100))},
		"cpu (4)":                     {"size": "0x00000000", "data": ""},
	}
	hs := state[HandshakeIDStr+" (0)"]
	delete(state, HandshakeIDStr+" (0)")
	if !reflect.DeepEqual(state, want) {
		t.Errorf("script output differs:\n got %v\nwant %v", state, want)
	}
	data, err := hex.DecodeString(strings.ReplaceAll(fmt.Sprint(hs["data"]), " ", ""))
	if err != nil {
		t.Fatalf("handshake data %v: %v", hs["data"], err)
	}
	var h Handshake
	if err := json.Unmarshal(data, &h); err != nil || h.GuestID != guestName || hs["size"] != fmt.Sprintf("0x%08x", len(data)) {
		t.Errorf("handshake as the script prints it: %v %+v size %v", err, h, hs["size"])
	}
}

func TestQEMUAnalyzeDesc(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	e := writeSample(t, &buf, false)
	out, stderr, ok := runScript(t, t.TempDir(), buf.Bytes(), "-d", "desc")
	if !ok {
		t.Fatalf("analyze-migration.py -d desc failed:\n%s", stderr)
	}
	var got VMDesc
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	if !reflect.DeepEqual(&got, e.VMDesc()) {
		t.Errorf("-d desc printed %+v, we wrote %+v", got, e.VMDesc())
	}
}

// TestQEMUAnalyzeExtract runs -x, which writes each RAM block to a file
// filled from our page records: the strongest check of offsets, CONTINUE
// and block switching.
func TestQEMUAnalyzeExtract(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	writeSample(t, &buf, false)
	dir := t.TempDir()
	_, stderr, ok := runScript(t, dir, buf.Bytes(), "-x")
	if !ok {
		t.Fatalf("analyze-migration.py -x failed:\n%s", stderr)
	}
	for _, blk := range []string{"pc.ram", romName} {
		got, err := os.ReadFile(filepath.Join(dir, blk))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, sampleImage(blk)) {
			t.Errorf("extracted %s differs from the pages we wrote", blk)
		}
	}
}

// TestQEMUAnalyzePadding: vmdescs whose natural length would hide them from
// the script's tail scan are found once padded; the unpadded control fails.
func TestQEMUAnalyzePadding(t *testing.T) {
	t.Parallel()
	for _, natural := range []int{0x17b, 0x7b05} {
		b, n := paddedStream(t, natural)
		if _, stderr, ok := runScript(t, t.TempDir(), b); !ok {
			t.Errorf("vmdesc of %#x bytes (natural %#x): script failed:\n%s", n, natural, stderr)
		}
	}
	b, _ := paddedStream(t, 0x17b)
	_, stderr, ok := runScript(t, t.TempDir(), unpad(b))
	if ok || !strings.Contains(stderr, "No Debug Migration device found") {
		t.Errorf("unpadded 0x17b-byte vmdesc: exit ok=%v, stderr:\n%s", ok, stderr)
	}
}

// TestQEMUAnalyzeLive documents a limitation QEMU shares: a stream with
// commands (return path) cannot be analysed.
func TestQEMUAnalyzeLive(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	writeSample(t, &buf, true)
	_, stderr, ok := runScript(t, t.TempDir(), buf.Bytes())
	if ok || !(strings.Contains(stderr, "Unknown section type: 8") || strings.Contains(stderr, "Unknown QEMU_VM_COMMAND")) {
		t.Errorf("live stream: exit ok=%v, stderr:\n%s", ok, stderr)
	}
}

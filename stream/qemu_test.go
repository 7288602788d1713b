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
	"sync"
	"testing"
	"time"
)

// These tests run QEMU's own scripts/analyze-migration.py on files we write.
// The script comes from Debian's qemu source package, fetched once by
// shared/tools/qemu-src.sh into os.TempDir()/qemu-src-cache. The tools
// folder is $MIGCTL_QEMU_SRC if set (the folder, or the script itself), else
// ../shared/tools beside the module root. Without it, without network or apt,
// or without python3, the tests skip and say why.

var (
	qemuOnce   sync.Once
	qemuScript string
	qemuSkip   string
)

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}

func findQEMUSrcTool() (string, error) {
	if p := os.Getenv("MIGCTL_QEMU_SRC"); p != "" {
		if fi, err := os.Stat(p); err == nil && fi.IsDir() {
			p = filepath.Join(p, "qemu-src.sh")
		}
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("MIGCTL_QEMU_SRC=%s: %v", os.Getenv("MIGCTL_QEMU_SRC"), err)
		}
		return p, nil
	}
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	p := filepath.Join(root, "..", "shared", "tools", "qemu-src.sh")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("no %s (set MIGCTL_QEMU_SRC to the shared tools folder)", p)
	}
	return p, nil
}

// analyzeScript returns the path of analyze-migration.py or skips t.
func analyzeScript(t *testing.T) string {
	t.Helper()
	qemuOnce.Do(func() {
		if _, err := exec.LookPath("python3"); err != nil {
			qemuSkip = "python3 is not installed"
			return
		}
		tool, err := findQEMUSrcTool()
		if err != nil {
			qemuSkip = "cannot find qemu-src.sh: " + err.Error()
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "bash", tool, filepath.Join(os.TempDir(), "qemu-src-cache"))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			qemuSkip = fmt.Sprintf("cannot fetch QEMU's analyze-migration.py (no network or apt?): %v: %s", err, strings.TrimSpace(stderr.String()))
			return
		}
		qemuScript = strings.TrimSpace(string(out))
	})
	if qemuSkip != "" {
		t.Skip(qemuSkip)
	}
	return qemuScript
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

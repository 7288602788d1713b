// Package qemutools finds QEMU's own scripts/analyze-migration.py for
// tests, so migctl's streams are checked by a parser nobody here wrote. The
// script comes from Debian's qemu source package, fetched once by the
// workplace's shared/tools/qemu-src.sh into os.TempDir()/qemu-src-cache.
// The tools folder is $MIGCTL_QEMU_SRC if set (the folder, or the script
// itself), else ../shared/tools beside the module root.
package qemutools

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

var (
	once   sync.Once
	script string
	reason error
)

// AnalyzeScript returns the path of analyze-migration.py, fetching it on
// first use. The error says why it is not available (no python3, no
// qemu-src.sh, no network or apt); callers skip their test with it.
func AnalyzeScript() (string, error) {
	once.Do(func() { script, reason = fetch() })
	return script, reason
}

func fetch() (string, error) {
	if _, err := exec.LookPath("python3"); err != nil {
		return "", errors.New("python3 is not installed")
	}
	tool, err := findTool()
	if err != nil {
		return "", fmt.Errorf("cannot find qemu-src.sh: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", tool, filepath.Join(os.TempDir(), "qemu-src-cache"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("cannot fetch QEMU's analyze-migration.py (no network or apt?): %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(string(out)), nil
}

func findTool() (string, error) {
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
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// PythonDir returns the folder that holds QEMU's python package qemu (so
// `PYTHONPATH=dir python3 -m qemu.qmp.qmp_shell` runs QEMU's qmp-shell),
// fetched with AnalyzeScript's source. The error says why it is not
// available; callers skip their test with it.
func PythonDir() (string, error) {
	script, err := AnalyzeScript()
	if err != nil {
		return "", err
	}
	dirs, _ := filepath.Glob(filepath.Join(filepath.Dir(script), "src", "qemu-*", "python"))
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "qemu", "qmp", "qmp_shell.py")); err == nil {
			return d, nil
		}
	}
	return "", fmt.Errorf("no qemu-*/python/qemu/qmp/qmp_shell.py beside %s (an older qemu-src.sh cache? delete %s and rerun)", script, filepath.Dir(script))
}

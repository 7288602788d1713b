package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// olderRelease is the commit of the first migctl that landed (the seed's
// precopy over real transports, before the switchover commit protocol and
// the other extensions of the handshake): a peer that speaks none of them.
const olderRelease = "690d7b9"

// buildOlder builds migctl at olderRelease from this repository's history,
// or skips when the history is not there (a shallow clone).
func buildOlder(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed: building migctl " + olderRelease + " needs it")
	}
	if err := exec.Command("git", "cat-file", "-e", olderRelease+"^{commit}").Run(); err != nil {
		t.Skipf("commit %s is not in this clone's history (a shallow clone?): the interoperability test needs it", olderRelease)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	// From the top of the work tree: in a subdirectory git archive takes
	// only that subdirectory.
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Fatalf("git rev-parse --show-toplevel: %v", err)
	}
	archive := exec.Command("sh", "-c", "git archive "+olderRelease+" | tar -x -C "+src)
	archive.Dir = strings.TrimSpace(string(top))
	if out, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("git archive %s: %v\n%s", olderRelease, err, out)
	}
	bin := filepath.Join(dir, "migctl-"+olderRelease)
	build := exec.Command("go", "build", "-o", bin, "./cmd/migctl")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build migctl %s: %v\n%s", olderRelease, err, out)
	}
	return bin
}

// TestInteropWithOlderRelease migrates between this migctl and the first
// release, both ways, between real processes: each new side notices that
// its peer lacks the switchover commit protocol (and the handshake's other
// extensions) and falls back to the behaviour that peer expects, so the
// migration completes and the guest runs at the destination.
func TestInteropWithOlderRelease(t *testing.T) {
	old := buildOlder(t)
	// The first release's guest description has no defaults in common
	// with today's for the zero fraction: give every key.
	guest := "--guest=size=16M,dirty-rate=8M,seed=3,zero=0.1"
	for _, tc := range []struct {
		name     string
		src, dst string
	}{{"new source, old destination", binary, old}, {"old source, new destination", old, binary}} {
		t.Run(tc.name, func(t *testing.T) {
			src := startServeBin(t, tc.src, "src", guest)
			dst := startServeBin(t, tc.dst, "dst", guest, "--destination")
			dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
			port := listenPort(t, dst.info())
			src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":0}}`)
			src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port))
			src.waitStatus("completed")
			dst.waitStatus("completed")
			var rs struct {
				Status  string `json:"status"`
				Running bool   `json:"running"`
			}
			if err := json.Unmarshal(dst.ok(`{"execute":"query-status"}`), &rs); err != nil || !rs.Running {
				t.Fatalf("destination query-status %+v (%v)", rs, err)
			}
			// The new side did not run the protocol with an old peer: it
			// never entered the protocol's states.
			newSide, side := src, "outgoing"
			if tc.dst == binary {
				newSide, side = dst, "incoming"
			}
			var info map[string]struct {
				History []struct {
					To string `json:"to"`
				} `json:"history"`
			}
			if err := json.Unmarshal(newSide.ok(`{"execute":"query-migctl-machine","arguments":{"history":32}}`), &info); err != nil {
				t.Fatal(err)
			}
			var path []string
			for _, r := range info[side].History {
				path = append(path, r.To)
			}
			if slices.Contains(path, "committed") || slices.Contains(path, "loaded") || !slices.Contains(path, "completed") {
				t.Fatalf("the new %s side went %s", side, strings.Join(path, " → "))
			}
		})
	}
}

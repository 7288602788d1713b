package reliability

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/migctl/migctl/internal/mutant"
)

// binary is migctl, built once for every cell (with -race when the tests
// run with it, and with the tests' mutant tags).
var binary string

// self is this test binary: exec: cells run it as their pipe commands.
var self string

func TestMain(m *testing.M) {
	if len(os.Args) == 3 && (os.Args[1] == "pipe-send" || os.Args[1] == "pipe-recv") {
		os.Exit(pipe(os.Args[1], os.Args[2]))
	}
	var err error
	if self, err = os.Executable(); err != nil {
		panic(err)
	}
	dir, err := os.MkdirTemp("", "migctl-reliability-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "migctl")
	args := []string{"build", "-tags", strings.Join(mutant.Active, ","), "-o", binary}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, "../cmd/migctl")...)
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		panic("build migctl: " + err.Error())
	}
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// pipe is the exec: cells' command. pipe-send copies its stdin to the unix
// socket ADDR (the fault proxy) and half-closes it; pipe-recv copies from
// the unix socket ADDR to its stdout. Each exits 0 only when its copy
// ended cleanly.
func pipe(mode, addr string) int {
	c, err := net.Dial("unix", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, mode+":", err)
		return 1
	}
	defer c.Close()
	if mode == "pipe-send" {
		if _, err := io.Copy(c, os.Stdin); err != nil {
			fmt.Fprintln(os.Stderr, mode+":", err)
			return 1
		}
		if err := c.(*net.UnixConn).CloseWrite(); err != nil {
			fmt.Fprintln(os.Stderr, mode+":", err)
			return 1
		}
		return 0
	}
	if _, err := io.Copy(os.Stdout, c); err != nil {
		fmt.Fprintln(os.Stderr, mode+":", err)
		return 1
	}
	return 0
}

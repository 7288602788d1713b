package proc

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/migctl/migctl/uffd"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	Main() // a spawned guest process runs here and never returns
	goleak.VerifyTestMain(m)
}

const mib = 1 << 20

// start spawns a guest process from this test binary and attaches to it;
// the process is made to quit (or killed) and waited for at cleanup.
func start(t testing.TB, cfg Config) (*Process, *Client) {
	t.Helper()
	if cfg.Role == RoleDestination {
		if err := uffd.Probe(); err != nil {
			t.Skipf("a destination guest process needs userfaultfd: %v", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, c, err := Start(ctx, SpawnOptions{Config: cfg}, AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { finish(t, p, c) })
	return p, c
}

// finish ends a guest process: QUIT if the client still works, else kill.
func finish(t testing.TB, p *Process, c *Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if c != nil {
		if err := c.Quit(ctx); err != nil {
			p.Kill()
		}
	} else {
		p.Kill()
	}
	if err := p.Wait(ctx); errors.Is(err, context.DeadlineExceeded) {
		p.Kill()
		p.Wait(context.Background())
		t.Errorf("guest process %d did not exit after QUIT", p.PID)
	}
}

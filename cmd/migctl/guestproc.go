package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/guest/proc"
)

// postcopyHelp documents serve's --guest key postcopy.
const postcopyHelp = "serve also reads postcopy (on: the guest's vCPUs run in a guest process of their own, a re-executed\n" +
	"migctl, that owns its memfd RAM; on a destination it registers that RAM with userfaultfd before the vCPUs run,\n" +
	"which capability postcopy-ram needs there; default off: the guest runs inside serve's process), readers\n" +
	"(postcopy=on only: reader vCPUs, each on its own thread, that read every page over and over; the destination's\n" +
	"postcopy-vcpu-blocktime has one entry per reader; default 0) and socket (postcopy=on only: the PATH of the guest\n" +
	"process's control socket; default a new temporary directory's guest.sock; serve prints it either way).\n" +
	"The guest process outlives a serve killed during postcopy: its vCPUs block on the pages not received yet (never\n" +
	"reading zeros) and it waits for a new client; `serve --destination --reattach unix:SOCKET` takes it over.\n"

// guestStartTimeout bounds starting and attaching to a guest process.
const guestStartTimeout = 60 * time.Second

// keyPostcopy is the --guest key postcopy=on|off (not the spec's trigger).
const keyPostcopy = "postcopy"

// procDesc is what serve reads of a --guest description beyond the
// built-in guest's keys: postcopy=on|off, readers=N and socket=PATH.
type procDesc struct {
	postcopy bool
	readers  int
	socket   string // the guest process's control socket; "" picks one
}

// cutPostcopy removes serve's own keys (postcopy, readers) from a --guest
// description and returns the rest and their values.
func cutPostcopy(s string) (rest string, d procDesc, err error) {
	var keep []string
	seen := map[string]bool{}
	for _, kv := range strings.Split(s, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(kv), "=")
		if k != keyPostcopy && k != "readers" && k != "socket" {
			keep = append(keep, kv)
			continue
		}
		if seen[k] {
			return "", d, fmt.Errorf("--guest: %s given twice", k)
		}
		seen[k] = true
		switch k {
		case keyPostcopy:
			var ok bool
			if d.postcopy, ok = parseOnOff(v, false); !ok {
				return "", d, fmt.Errorf("--guest postcopy=%s: want %s", v, onOffWords)
			}
		case "readers":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > proc.MaxReaders {
				return "", d, fmt.Errorf("--guest readers=%s: want 0..%d", v, proc.MaxReaders)
			}
			d.readers = n
		case "socket":
			if v == "" {
				return "", d, errors.New("--guest socket=: give the PATH of the guest process's control socket")
			}
			d.socket = v
		}
	}
	if d.readers > 0 && !d.postcopy {
		return "", d, fmt.Errorf("--guest readers=%d: reader vCPUs run in a guest process only; add postcopy=on", d.readers)
	}
	if d.socket != "" && !d.postcopy {
		return "", d, fmt.Errorf("--guest socket=%s: only a guest process has a control socket; add postcopy=on", d.socket)
	}
	return strings.Join(keep, ","), d, nil
}

// guestProcess is serve's guest process and the client attached to it.
type guestProcess struct {
	p      *proc.Process // nil for a guest process serve attached to (--reattach)
	c      *proc.Client
	socket string // its control socket
}

// startGuestProcess spawns this binary as the guest process of cfg (a
// destination's RAM is holes registered with userfaultfd) and attaches.
func startGuestProcess(cmd *cobra.Command, cfg guest.Config, pd procDesc, dest bool) (*guestProcess, error) {
	role := proc.RoleSource
	if dest {
		role = proc.RoleDestination
	}
	cfg.Backing = guest.BackingMemfd
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, guestStartTimeout)
	defer cancel()
	p, c, err := proc.Start(ctx, proc.SpawnOptions{Config: proc.Config{Guest: cfg, Role: role, Readers: pd.readers}, Socket: pd.socket, Stderr: os.Stderr}, proc.AttachOptions{})
	if err != nil {
		return nil, fmt.Errorf("--guest …,postcopy=on: start the guest process: %w", err)
	}
	return &guestProcess{p: p, c: c, socket: p.Socket}, nil
}

// attachGuestProcess attaches to the running guest process whose control
// socket is addr (unix:PATH): `serve --destination --reattach`.
func attachGuestProcess(cmd *cobra.Command, addr string) (*guestProcess, error) {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok || path == "" {
		return nil, usagef("--reattach %s: give the guest process's control socket as unix:PATH", addr)
	}
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, guestStartTimeout)
	defer cancel()
	c, err := proc.Attach(ctx, path, proc.AttachOptions{})
	if err != nil {
		return nil, fmt.Errorf("--reattach %s: %w", addr, err)
	}
	if h := c.Hello(); h.Role != proc.RoleDestination || !h.UFFD || !h.Bitmap {
		c.Close()
		return nil, fmt.Errorf("--reattach %s: guest process %d is a %s without a userfaultfd and received bitmap: only a postcopy destination's guest process can be reattached", addr, h.PID, h.Role)
	}
	return &guestProcess{c: c, socket: path}, nil
}

// stop asks the guest process to quit and waits for it (bounded); it is
// killed when it does not. A guest process serve attached to (--reattach)
// is not its child: it is only asked to quit.
func (g *guestProcess) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if g.p == nil {
		_ = g.c.Quit(ctx)
		return
	}
	if g.c.Quit(ctx) != nil {
		g.p.Kill()
	}
	if g.p.Wait(ctx) != nil {
		g.p.Kill()
		kctx, kcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer kcancel()
		_ = g.p.Wait(kctx)
	}
}

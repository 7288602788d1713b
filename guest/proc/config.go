package proc

import (
	"fmt"
	"time"

	"github.com/migctl/migctl/guest"
)

// Role is what a guest process is started for.
type Role string

const (
	// RoleSource: RAM filled with the built-in guest's pattern
	// (guest.New); no userfaultfd. migctl reads pages through its own
	// mapping of the memfds.
	RoleSource Role = "source"
	// RoleDestination: RAM of holes (guest.NewDestination), registered
	// with a userfaultfd (MISSING) before any vCPU can run, and a received
	// bitmap in shared memory. migctl writes precopy pages through its
	// mapping while the guest is stopped and serves faults after it starts.
	RoleDestination Role = "destination"
)

// Defaults of [Config].
const (
	DefaultAttachTimeout = 10 * time.Minute
	DefaultIdleTimeout   = 60 * time.Second
	DefaultOpTimeout     = 10 * time.Second
	// MaxReaders bounds Config.Readers.
	MaxReaders = 64
)

// Config describes a guest process. [Spawn] hands it to the child.
type Config struct {
	// Guest is the built-in guest's configuration; its writers (DirtyRate,
	// Writers) run in the guest process. Its RAM must be shared with
	// migctl's process, so Guest.Backing must be guest.BackingMemfd (""
	// means it here); Guest.Prealloc is refused for RoleDestination, whose
	// holes must stay holes until migctl installs each page.
	Guest guest.Config `json:"guest"`
	// Role: RoleSource or RoleDestination.
	Role Role `json:"role"`
	// Readers is the number of reader vCPUs: goroutines locked to their own
	// OS threads (their ids are the vCPU threads of blocktime) that sweep
	// the pages they own in a random order, over and over, while the guest
	// runs, time each page's first touch and count every data page they
	// find all zero (a lost page). 0: none.
	Readers int `json:"readers"`
	// AttachTimeout bounds the wait for a client: the first, and the next
	// after one detaches (or dies). When it passes with no client, the guest
	// process exits with status 3 (the guest is lost; it never ran on a page
	// of zeros). 0: DefaultAttachTimeout.
	AttachTimeout time.Duration `json:"attach_timeout"`
	// IdleTimeout: a client that sends nothing for this long is dropped
	// (as if it had died). Clients ping at a third of it. 0:
	// DefaultIdleTimeout.
	IdleTimeout time.Duration `json:"idle_timeout"`
	// OpTimeout bounds how long a request waits for the vCPUs (STOP waits
	// for vCPUs blocked on missing pages) before it fails with ErrTimeout.
	// 0: DefaultOpTimeout.
	OpTimeout time.Duration `json:"op_timeout"`
}

func (c *Config) withDefaults() Config {
	d := *c
	if d.Guest.Backing == "" {
		d.Guest.Backing = guest.BackingMemfd
	}
	if d.AttachTimeout <= 0 {
		d.AttachTimeout = DefaultAttachTimeout
	}
	if d.IdleTimeout <= 0 {
		d.IdleTimeout = DefaultIdleTimeout
	}
	if d.OpTimeout <= 0 {
		d.OpTimeout = DefaultOpTimeout
	}
	return d
}

func (c *Config) validate() error {
	if c.Role != RoleSource && c.Role != RoleDestination {
		return fmt.Errorf("guest process: role %q: use %q or %q", c.Role, RoleSource, RoleDestination)
	}
	if c.Readers < 0 || c.Readers > MaxReaders {
		return fmt.Errorf("guest process: %d readers: use 0..%d", c.Readers, MaxReaders)
	}
	if c.Guest.Backing != guest.BackingMemfd {
		return fmt.Errorf("guest process: guest backing %q: a guest process shares its RAM with migctl through memfds: use %q: %w", c.Guest.Backing, guest.BackingMemfd, guest.ErrConfig)
	}
	if c.Guest.Prealloc && c.Role == RoleDestination {
		return fmt.Errorf("guest process: Prealloc on a destination would fill the holes userfaultfd must catch (the guest would read zeros for pages never received): turn it off: %w", guest.ErrConfig)
	}
	if c.Guest.Size <= 0 {
		return fmt.Errorf("guest process: guest size %d: %w", c.Guest.Size, guest.ErrConfig)
	}
	return nil
}

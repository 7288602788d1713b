package transport

import (
	"context"
	"fmt"
	"sync"
)

// Scheme opens one kind of migration address for another package: the
// rdma package registers rdma: so that transport never imports it (as
// Cloud Hypervisor's transports plug in by role). transport itself opens
// tcp:, unix:, fd:, file: and exec:.
type Scheme interface {
	// Dial opens the outgoing channel to a.
	Dial(ctx context.Context, a Addr, c *Config) (Conn, error)
	// Listen starts the incoming side on a.
	Listen(ctx context.Context, a Addr, c *Config) (Listener, error)
}

// RAMBlock is one region of guest RAM a transport may write into directly
// (RDMA's one-sided writes land there with no loader parsing them).
type RAMBlock struct {
	Name string
	Mem  []byte
}

var (
	schemesMu sync.RWMutex
	schemes   = map[string]Scheme{}
)

// Register makes Dial and Listen open addresses of scheme (a Parse-able
// URI scheme transport does not open itself, such as rdma) with s. It
// panics if the scheme is registered twice, like database/sql.Register.
func Register(scheme string, s Scheme) {
	schemesMu.Lock()
	defer schemesMu.Unlock()
	if _, dup := schemes[scheme]; dup {
		panic(fmt.Sprintf("transport: scheme %q registered twice", scheme))
	}
	schemes[scheme] = s
}

func registered(scheme string) Scheme {
	schemesMu.RLock()
	defer schemesMu.RUnlock()
	return schemes[scheme]
}

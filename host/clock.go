package host

import (
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// A Stamp is an instant on this host's CLOCK_MONOTONIC, with the boot it
// belongs to: two processes on the same host (same boot) can subtract
// their stamps; processes on different hosts, or across a reboot, cannot.
// migctl measures a guest's true downtime with them: the source's stop
// and the destination's start.
type Stamp struct {
	Boot [16]byte      // /proc/sys/kernel/random/boot_id
	Mono time.Duration // CLOCK_MONOTONIC since boot
}

// Now returns the current Stamp. The boot id is read once; if it cannot
// be read the Boot is all zero and Sub never matches another stamp.
func Now() Stamp {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return Stamp{Boot: bootID(), Mono: time.Duration(ts.Nano())}
}

// Sub returns s − t and true when both stamps are on the same boot of the
// same host (and that boot is known).
func (s Stamp) Sub(t Stamp) (time.Duration, bool) {
	if s.Boot != t.Boot || s.Boot == ([16]byte{}) {
		return 0, false
	}
	return s.Mono - t.Mono, true
}

var bootOnce = sync.OnceValue(func() [16]byte {
	b, err := readBootID("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return [16]byte{}
	}
	return b
})

func bootID() [16]byte { return bootOnce() }

// readBootID parses a boot_id file (a UUID in its text form).
func readBootID(path string) ([16]byte, error) {
	var id [16]byte
	data, err := os.ReadFile(path)
	if err != nil {
		return id, err
	}
	h := strings.ReplaceAll(strings.TrimSpace(string(data)), "-", "")
	if len(h) != 32 {
		return id, fmt.Errorf("%s: %q is not a UUID", path, data)
	}
	if _, err := hex.Decode(id[:], []byte(h)); err != nil {
		return id, fmt.Errorf("%s: %w", path, err)
	}
	return id, nil
}

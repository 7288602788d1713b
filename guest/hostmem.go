package guest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"unsafe"
)

// ErrNoMemory: the host has less memory available than a guest needs
// ([CheckMemory]; New and NewDestination with Config.Prealloc). The error
// returned is a [*MemoryError] that wraps it.
var ErrNoMemory = errors.New("not enough host memory")

// MemoryError says how much memory was needed and how much the host had
// available (MemAvailable in /proc/meminfo: free memory plus what the kernel
// can reclaim without swapping).
type MemoryError struct {
	Need      int64 // bytes asked for
	Available int64 // bytes available
}

func (e *MemoryError) Error() string {
	return fmt.Sprintf("guest: need %d bytes (%s) of memory but the host has %d bytes (%s) available (MemAvailable in /proc/meminfo): use a smaller guest, or free %s",
		e.Need, iec(e.Need), e.Available, iec(e.Available), iec(e.Need-e.Available))
}

// Unwrap returns [ErrNoMemory].
func (e *MemoryError) Unwrap() error { return ErrNoMemory }

// iec formats bytes in MiB or GiB with one decimal.
func iec(n int64) string {
	if n >= 1<<30 || n <= -(1<<30) {
		return strconv.FormatFloat(float64(n)/(1<<30), 'f', 1, 64) + " GiB"
	}
	return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64) + " MiB"
}

// meminfoPath is read by CheckMemory (tests point it elsewhere).
var meminfoPath = "/proc/meminfo"

// CheckMemory returns nil if the host has at least size bytes available
// (MemAvailable in /proc/meminfo), and a [*MemoryError] wrapping
// [ErrNoMemory] otherwise. Call it before starting a guest: a guest whose
// RAM cannot all be faulted in is killed by the kernel's OOM killer at some
// page, mid-migration, with no error to report. A process that holds both
// sides of a migration (the demo) checks for twice the guest's size.
//
// MemAvailable is the kernel's estimate at the time of the call, not a
// reservation: other processes may take the memory afterwards.
func CheckMemory(size int64) error {
	if size < 0 {
		return fmt.Errorf("guest: CheckMemory(%d): size is negative: %w", size, ErrConfig)
	}
	b, err := os.ReadFile(meminfoPath)
	if err != nil {
		return fmt.Errorf("guest: reading available memory: %w", err)
	}
	avail, err := parseMemAvailable(b)
	if err != nil {
		return fmt.Errorf("guest: %s: %w", meminfoPath, err)
	}
	if avail < size {
		return &MemoryError{Need: size, Available: avail}
	}
	return nil
}

// parseMemAvailable returns MemAvailable from /proc/meminfo, in bytes.
func parseMemAvailable(b []byte) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if kb, ok := kbField(sc.Bytes(), "MemAvailable:"); ok {
			return kb, nil
		}
	}
	return 0, errors.New("no MemAvailable line (Linux 3.14 or later has it)")
}

// kbField parses a "Key:   123 kB" line of /proc/meminfo or smaps into
// bytes; ok is false for another key or a malformed line.
func kbField(line []byte, key string) (int64, bool) {
	rest, found := bytes.CutPrefix(line, []byte(key))
	if !found {
		return 0, false
	}
	f := bytes.Fields(rest)
	if len(f) != 2 || string(f[1]) != "kB" || len(f[0]) > 15 {
		return 0, false
	}
	kb, err := strconv.ParseInt(string(f[0]), 10, 64)
	if err != nil || kb < 0 {
		return 0, false
	}
	return kb << 10, true
}

// addrRange is [lo, hi) in the address space.
type addrRange struct{ lo, hi uint64 }

func blockRange(b *Block) addrRange {
	lo := uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b.Mem))))
	return addrRange{lo, lo + uint64(len(b.Mem))}
}

// smapsPath is read by hugeMapped (tests point it elsewhere).
var smapsPath = "/proc/self/smaps"

// hugeMapped returns, for each range, how many of its bytes are mapped by
// huge pages according to /proc/self/smaps: the AnonHugePages plus
// ShmemPmdMapped of every mapping that overlaps the range, each capped at
// the overlap. (The process-wide /proc/self/smaps_rollup carries the same
// counters but sums them over the Go heap and every other guest in the
// process; the per-mapping file tells this guest's apart.)
func hugeMapped(ranges []addrRange) ([]int64, error) {
	b, err := os.ReadFile(smapsPath)
	if err != nil {
		return nil, fmt.Errorf("guest: reading huge page counters: %w", err)
	}
	return parseSmapsHuge(b, ranges), nil
}

// parseSmapsHuge is hugeMapped's parser. Lines it does not understand are
// skipped.
func parseSmapsHuge(b []byte, ranges []addrRange) []int64 {
	// Sums saturate at 1<<62 and each result is capped at its range's
	// length, so no input (overlapping or absurd mappings) can overflow.
	const ceiling = 1 << 62
	out := make([]int64, len(ranges))
	var cur addrRange
	var huge int64
	flush := func() {
		if huge == 0 {
			return
		}
		for i, r := range ranges {
			lo, hi := max(r.lo, cur.lo), min(r.hi, cur.hi)
			if lo < hi {
				out[i] = min(out[i]+min(huge, int64(min(hi-lo, ceiling))), ceiling)
			}
		}
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 4096), 1<<20) // a path can be long; longer lines stop the scan
	for sc.Scan() {
		line := sc.Bytes()
		if r, ok := vmaHeader(line); ok {
			flush()
			cur, huge = r, 0
			continue
		}
		for _, key := range []string{"AnonHugePages:", "ShmemPmdMapped:"} {
			if n, ok := kbField(line, key); ok {
				huge = min(huge+n, ceiling) // n < 1<<60: 15 digits of kB
			}
		}
	}
	flush()
	for i, r := range ranges {
		out[i] = min(out[i], int64(min(r.hi-r.lo, ceiling)))
	}
	return out
}

// vmaHeader parses the "lo-hi perms ..." line that opens a mapping in smaps.
func vmaHeader(line []byte) (addrRange, bool) {
	f, _, _ := bytes.Cut(line, []byte(" "))
	los, his, ok := bytes.Cut(f, []byte("-"))
	if !ok || len(los) == 0 || len(los) > 16 || len(his) == 0 || len(his) > 16 {
		return addrRange{}, false
	}
	lo, err1 := strconv.ParseUint(string(los), 16, 64)
	hi, err2 := strconv.ParseUint(string(his), 16, 64)
	if err1 != nil || err2 != nil || hi < lo {
		return addrRange{}, false
	}
	return addrRange{lo, hi}, true
}

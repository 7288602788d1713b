package multifd

import (
	"encoding/binary"
	"fmt"
)

// ZeroPageDetection is QEMU's zero-page-detection parameter (QEMU >= 9.0;
// machine types <= 8.2 default to legacy, newer ones to multifd; QEMU 7.2
// behaves as legacy).
type ZeroPageDetection uint8

const (
	// ZeroLegacy: the main migration thread tests every page before sending
	// it; a zero page goes as a ZERO record (RAM_SAVE_FLAG_ZERO, one fill
	// byte) on the main channel, whether multifd is on or not.
	ZeroLegacy ZeroPageDetection = iota
	// ZeroNone: no page is tested; every page travels with its bytes (a PAGE
	// record, or a normal page of a multifd packet).
	ZeroNone
	// ZeroMultifd: the main thread queues every page to multifd untested;
	// the channel's sender tests the pages of each packet and lists the zero
	// ones as zero entries (Header.Zero). Without multifd it is ZeroLegacy:
	// QEMU's ram_save_target_page calls save_zero_page on the main thread
	// whenever multifd is off, and save_zero_page skips the test only for
	// none.
	ZeroMultifd
)

// ParseZeroPageDetection maps QEMU's values "none", "legacy", "multifd".
func ParseZeroPageDetection(s string) (ZeroPageDetection, error) {
	switch s {
	case "legacy":
		return ZeroLegacy, nil
	case "none":
		return ZeroNone, nil
	case "multifd":
		return ZeroMultifd, nil
	}
	return 0, fmt.Errorf("multifd: zero-page-detection %q: want none, legacy or multifd", s)
}

// String returns QEMU's name.
func (z ZeroPageDetection) String() string {
	switch z {
	case ZeroLegacy:
		return "legacy"
	case ZeroNone:
		return "none"
	case ZeroMultifd:
		return "multifd"
	}
	return fmt.Sprintf("zero-page-detection(%d)", uint8(z))
}

// Route is where the page scanner sends a dirty page.
type Route uint8

const (
	// RouteMainZero: a ZERO record on the main channel.
	RouteMainZero Route = iota + 1
	// RouteMainPage: a PAGE record on the main channel (multifd off).
	RouteMainPage
	// RouteMultifd: queued to a multifd channel, whose sender may still
	// list it as a zero entry (ZeroMultifd, see Partition).
	RouteMultifd
)

// String returns "main-zero", "main-page" or "multifd".
func (r Route) String() string {
	switch r {
	case RouteMainZero:
		return "main-zero"
	case RouteMainPage:
		return "main-page"
	case RouteMultifd:
		return "multifd"
	}
	return fmt.Sprintf("route(%d)", uint8(r))
}

// Classify is the main thread's decision for one dirty page, as QEMU's
// ram_save_target_page makes it (>= 9.0; QEMU 7.2 is ZeroLegacy):
//
//	mode     multifd  page is zero   route
//	legacy   off      yes            main-zero
//	legacy   off      no             main-page
//	legacy   on       yes            main-zero
//	legacy   on       no             multifd
//	none     off      -              main-page   (isZero not called)
//	none     on       -              multifd     (sent with its bytes)
//	multifd  off      yes            main-zero   (as legacy)
//	multifd  off      no             main-page   (as legacy)
//	multifd  on       -              multifd     (the channel tests it)
//
// isZero is called only when the mode tests pages on the main thread.
func Classify(mode ZeroPageDetection, multifd bool, isZero func() bool) Route {
	mainTests := mode == ZeroLegacy || mode == ZeroMultifd && !multifd
	if mainTests && isZero() {
		return RouteMainZero
	}
	if multifd {
		return RouteMultifd
	}
	return RouteMainPage
}

// Partition is what a multifd channel's sender does with a queued batch
// under ZeroMultifd (QEMU's multifd_send_zero_page_detect): it moves the
// zero pages to the end of offsets, in place, and returns how many normal
// pages come first.
// The order is QEMU's: a left cursor skips normal pages, a zero page is
// swapped with the entry at the right cursor, which moves left; so offsets
// are not sorted and page data follows the array's order. pages[i] is the
// page at offsets[i] and is permuted alongside.
func Partition(offsets []uint64, pages [][]byte, isZero func(page []byte) bool) int {
	i, j := 0, len(offsets)-1
	for i <= j {
		if !isZero(pages[i]) {
			i++
			continue
		}
		offsets[i], offsets[j] = offsets[j], offsets[i]
		pages[i], pages[j] = pages[j], pages[i]
		j--
	}
	return i
}

// IsZero reports whether page holds only zero bytes.
func IsZero(page []byte) bool {
	for len(page) >= 32 {
		if binary.NativeEndian.Uint64(page)|binary.NativeEndian.Uint64(page[8:])|
			binary.NativeEndian.Uint64(page[16:])|binary.NativeEndian.Uint64(page[24:]) != 0 {
			return false
		}
		page = page[32:]
	}
	for _, c := range page {
		if c != 0 {
			return false
		}
	}
	return true
}

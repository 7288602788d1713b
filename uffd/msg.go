package uffd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// MsgSize is the size of one struct uffd_msg: every read(2) of a
// userfaultfd returns a whole number of them.
const MsgSize = 32

// Event is the kind of a message (UFFD_EVENT_*).
type Event uint8

// The events. Only [EventPagefault] is delivered unless the descriptor
// enabled the matching FeatureEvent* features.
const (
	EventPagefault Event = 0x12
	EventFork      Event = 0x13
	EventRemap     Event = 0x14
	EventRemove    Event = 0x15
	EventUnmap     Event = 0x16
)

// String names the event as the kernel header does, without the prefix.
func (e Event) String() string {
	switch e {
	case EventPagefault:
		return "pagefault"
	case EventFork:
		return "fork"
	case EventRemap:
		return "remap"
	case EventRemove:
		return "remove"
	case EventUnmap:
		return "unmap"
	}
	return fmt.Sprintf("event %#x", uint8(e))
}

// FaultFlags describe a page fault (UFFD_PAGEFAULT_FLAG_*).
type FaultFlags uint64

// The page-fault flags. A MISSING fault on a read has no flag set.
const (
	FaultWrite FaultFlags = 1 << 0 // the access was a write
	FaultWP    FaultFlags = 1 << 1 // write-protect fault (ModeWP)
	FaultMinor FaultFlags = 1 << 2 // minor fault (ModeMinor)
)

// Msg is one decoded struct uffd_msg.
//
// For [EventPagefault]: Flags, Address (the faulting address; rounded down
// to the page unless FeatureExactAddress is on) and TID (the faulting
// thread, only with [FeatureThreadID]; otherwise 0). For the other events
// the union's three words are in Arg, as the kernel wrote them: fork
// (Arg[0] low 32 bits: the new descriptor), remap (from, to, len), remove
// and unmap (start, end).
type Msg struct {
	Event   Event
	Flags   FaultFlags
	Address uint64
	TID     uint32
	Arg     [3]uint64
}

// ErrMessage marks bytes that are not a valid uffd_msg.
var ErrMessage = errors.New("uffd: malformed message")

// ParseMsg decodes one message from exactly [MsgSize] bytes. It rejects
// unknown events, non-zero reserved bytes and, for page faults, flag bits
// and padding the kernel never sets: such bytes did not come from a
// userfaultfd, or the kernel's ABI changed and this code must change too.
func ParseMsg(b []byte) (Msg, error) {
	if len(b) != MsgSize {
		return Msg{}, fmt.Errorf("uffd: a message is %d bytes, got %d: %w", MsgSize, len(b), ErrMessage)
	}
	m := Msg{Event: Event(b[0])}
	if b[1] != 0 || binary.LittleEndian.Uint16(b[2:4]) != 0 || binary.LittleEndian.Uint32(b[4:8]) != 0 {
		return Msg{}, fmt.Errorf("uffd: %v message has non-zero reserved bytes % x: %w", m.Event, b[1:8], ErrMessage)
	}
	for i := range m.Arg {
		m.Arg[i] = binary.LittleEndian.Uint64(b[8+8*i:])
	}
	switch m.Event {
	case EventPagefault:
		m.Flags = FaultFlags(m.Arg[0])
		m.Address = m.Arg[1]
		m.TID = uint32(m.Arg[2])
		if m.Flags&^(FaultWrite|FaultWP|FaultMinor) != 0 {
			return Msg{}, fmt.Errorf("uffd: page fault with unknown flags %#x: %w", uint64(m.Flags), ErrMessage)
		}
		if m.Arg[2]>>32 != 0 {
			return Msg{}, fmt.Errorf("uffd: page fault with non-zero padding after the thread id: %w", ErrMessage)
		}
	case EventFork, EventRemap, EventRemove, EventUnmap:
	default:
		return Msg{}, fmt.Errorf("uffd: unknown event %#x: %w", uint8(m.Event), ErrMessage)
	}
	return m, nil
}

// AppendMsg encodes m as the kernel would (for tests and tools). For a page
// fault it writes Flags, Address and TID; for other events, Arg.
func AppendMsg(dst []byte, m Msg) []byte {
	var b [MsgSize]byte
	b[0] = byte(m.Event)
	arg := m.Arg
	if m.Event == EventPagefault {
		arg = [3]uint64{uint64(m.Flags), m.Address, uint64(m.TID)}
	}
	for i, v := range arg {
		binary.LittleEndian.PutUint64(b[8+8*i:], v)
	}
	return append(dst, b[:]...)
}

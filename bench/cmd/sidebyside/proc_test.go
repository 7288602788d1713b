package main

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/migctl/migctl/qmp"
)

// /proc/PID/stat: utime and stime are fields 14 and 15, counted after the
// command name, which may hold spaces and parentheses.
func TestParseStatTicks(t *testing.T) {
	cases := []struct {
		stat string
		want uint64
		ok   bool
	}{
		{"1234 (qemu-system-x86) S 1 1234 1234 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 100 0 0", 22, true},
		{"99 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 40 2 0 0", 42, true},
		{"99 (x) R 1 2", 0, false},
		{"no parenthesis", 0, false},
		{"99 (x) R 1 2 3 4 5 6 7 8 9 10 u 2 0 0", 0, false},
	}
	for _, c := range cases {
		got, err := parseStatTicks(c.stat)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("parseStatTicks(%q) = %d, %v; want %d, ok=%v", c.stat, got, err, c.want, c.ok)
		}
	}
}

func TestParseStatusKB(t *testing.T) {
	status := "Name:\tmigctl\nVmHWM:\t  2101248 kB\nVmRSS:\t   20480 kB\nThreads:\t9\n"
	cases := []struct {
		key  string
		want uint64
		ok   bool
	}{
		{"VmHWM", 2101248 << 10, true},
		{"VmRSS", 20480 << 10, true},
		{"Threads", 0, false}, // no kB
		{"VmSwap", 0, false},  // absent
	}
	for _, c := range cases {
		got, err := parseStatusKB(status, c.key)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("%s: %d, %v; want %d, ok=%v", c.key, got, err, c.want, c.ok)
		}
	}
}

// listenURI reads the real port of a tcp:…:0 listener from query-migrate.
func TestListenURI(t *testing.T) {
	got, err := listenURI(qmp.MigrationInfo{SocketAddress: []qmp.SocketAddress{{Type: "inet", Host: "127.0.0.1", Port: "38189"}}})
	if err != nil || got != "tcp:127.0.0.1:38189" {
		t.Errorf("listenURI = %q, %v", got, err)
	}
	if got, err := listenURI(qmp.MigrationInfo{SocketAddress: []qmp.SocketAddress{{Type: "inet", Host: "127.0.0.1", Port: "0"}}}); err == nil {
		t.Errorf("port 0 gave %q", got)
	}
	if _, err := listenURI(qmp.MigrationInfo{}); err == nil {
		t.Error("no socket address gave a URI")
	}
}

// waitFor finds an event that already arrived or arrives later, ignores
// events older than its start, and ends with the connection or ctx.
func TestEventLogWaitFor(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ev := func(name string, at time.Time) qmp.Event {
		return qmp.Event{Event: name, Timestamp: qmp.NewTimestamp(at)}
	}
	ch := make(chan qmp.Event, 4)
	l := newEventLog()
	collected := make(chan struct{})
	go func() {
		l.collect(ch)
		close(collected)
	}()
	ch <- ev("STOP", t0.Add(-time.Second)) // before the migration: ignored
	ch <- ev("RESUME", t0.Add(time.Second))
	got, err := l.waitFor(t.Context(), "RESUME", t0)
	if err != nil || !got.Timestamp.Time().Equal(t0.Add(time.Second)) {
		t.Fatalf("RESUME: %+v, %v", got, err)
	}
	// STOP arrives after the wait started.
	res := make(chan qmp.Event, 1)
	go func() {
		e, _ := l.waitFor(t.Context(), "STOP", t0)
		res <- e
	}()
	ch <- ev("STOP", t0.Add(2*time.Second))
	if e := <-res; !e.Timestamp.Time().Equal(t0.Add(2 * time.Second)) {
		t.Fatalf("STOP: %+v, want the one after t0", e)
	}
	ctx, cancel := context.WithCancelCause(t.Context())
	gone := errors.New("test gave up")
	cancel(gone)
	if _, err := l.waitFor(ctx, "SHUTDOWN", t0); !errors.Is(err, gone) {
		t.Errorf("cancelled wait: %v, want the context's cause", err)
	}
	close(ch)
	<-collected
	if _, err := l.waitFor(t.Context(), "SHUTDOWN", t0); !errors.Is(err, errNoEvent) {
		t.Errorf("wait on an ended connection: %v, want errNoEvent", err)
	}
}

// HMP's xp /2gx answer, as QEMU 7.2 prints it.
func TestParseXP(t *testing.T) {
	got, err := parseXP("0000000000100000: 0x8f1c2e3d4a5b6c7d 0x0000000000000001\r\n")
	if err != nil || got != [2]uint64{0x8f1c2e3d4a5b6c7d, 1} {
		t.Errorf("parseXP = %x, %v", got, err)
	}
	for _, bad := range []string{"", "Cannot access memory", "0000: 0x1", "0000: 0xzz 0x1"} {
		if _, err := parseXP(bad); err == nil {
			t.Errorf("parseXP(%q) accepted", bad)
		}
	}
}

package guest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The words of a run log line (Config.RunLogFile): "start NANOSECONDS"
// when the guest starts running, "stop NANOSECONDS" when it stops.
const (
	runLogStart = "start"
	runLogStop  = "stop"
)

// The run log file (Config.RunLogFile) is evidence that survives the
// process: every Start and Stop of the guest appends one line
//
//	start NANOSECONDS
//	stop NANOSECONDS
//
// with NANOSECONDS read from CLOCK_MONOTONIC, which every process of the
// host shares, so the logs of a migration's two guests can be compared.
// Each line is one write(2) to a descriptor opened with O_APPEND, so it is
// in the kernel's page cache before the next instruction: a process killed
// with SIGKILL loses none of them, and an interval it left open ends when
// it died. Start writes its line before any writer runs (its time is no
// later than the guest's first write); Stop writes its line once every
// writer has stopped (no earlier than the last write). Two guests whose
// logged intervals do not overlap therefore never ran at once.

// Monotonic returns the time on CLOCK_MONOTONIC in nanoseconds, the clock
// of the run log file.
func Monotonic() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic("guest: CLOCK_MONOTONIC: " + err.Error()) // Linux always has it
	}
	return ts.Nano()
}

// Span is one run interval of a run log file, in CLOCK_MONOTONIC
// nanoseconds. Stop is 0 while open: the guest ran until the log ended
// (its process was killed, or it still runs).
type Span struct {
	Start, Stop int64
}

// maxRunLogLine bounds one line of a run log file.
const maxRunLogLine = 64

// ParseRunLog reads a run log file. It fails on a malformed line, on a
// time that goes backwards, on two starts without a stop between them and
// on a stop without a start. A line cut short at the end (the writer died
// in the middle of a write(2), which the kernel does not do for short
// writes, or the file was truncated) is refused like any malformed line.
func ParseRunLog(r io.Reader) ([]Span, error) {
	var spans []Span
	br := bufio.NewReaderSize(r, 4096)
	var last int64
	open := false
	for n := 1; ; n++ {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, io.EOF) && len(line) == 0 {
			return spans, nil
		}
		if errors.Is(err, bufio.ErrBufferFull) || len(line) > maxRunLogLine {
			return nil, fmt.Errorf("guest: run log line %d is longer than %d bytes", n, maxRunLogLine)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("guest: run log: %w", err)
		}
		if !strings.HasSuffix(string(line), "\n") {
			return nil, fmt.Errorf("guest: run log line %d (%q) does not end with a newline", n, line)
		}
		word, num, ok := strings.Cut(strings.TrimSuffix(string(line), "\n"), " ")
		t, perr := strconv.ParseInt(num, 10, 64)
		if !ok || perr != nil || t <= 0 {
			return nil, fmt.Errorf("guest: run log line %d (%q): want \"start NANOSECONDS\" or \"stop NANOSECONDS\"", n, line)
		}
		if t < last {
			return nil, fmt.Errorf("guest: run log line %d: time %d is before the previous line's %d", n, t, last)
		}
		last = t
		switch word {
		case runLogStart:
			if open {
				return nil, fmt.Errorf("guest: run log line %d: start while running (no stop since the start at %d)", n, spans[len(spans)-1].Start)
			}
			spans = append(spans, Span{Start: t})
			open = true
		case runLogStop:
			if !open {
				return nil, fmt.Errorf("guest: run log line %d: stop while stopped", n)
			}
			spans[len(spans)-1].Stop = t
			open = false
		default:
			return nil, fmt.Errorf("guest: run log line %d (%q): want \"start NANOSECONDS\" or \"stop NANOSECONDS\"", n, line)
		}
	}
}

// ReadRunLog parses the run log file at path.
func ReadRunLog(path string) ([]Span, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("guest: run log: %w", err)
	}
	defer f.Close()
	return ParseRunLog(f)
}

// runLogFile is an open run log file; guarded by Builtin.mu.
type runLogFile struct {
	f *os.File
}

func openRunLog(path string) (*runLogFile, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("guest: run log file: %w", err)
	}
	return &runLogFile{f: f}, nil
}

// record appends one line with one write(2).
func (l *runLogFile) record(word string, t int64) error {
	if l == nil {
		return nil
	}
	if _, err := l.f.WriteString(word + " " + strconv.FormatInt(t, 10) + "\n"); err != nil {
		return fmt.Errorf("guest: run log file: %w", err)
	}
	return nil
}

func (l *runLogFile) close() error {
	if l == nil {
		return nil
	}
	return l.f.Close()
}

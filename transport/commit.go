package transport

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
)

// Committer is implemented by the outgoing channels of the one-way
// transports, which have no return path to learn the destination's fate:
// file:, exec: and fd: (this package's fd: Conns all implement it; only the
// pipe and file descriptors need it). For them, finishing a stream and
// abandoning it are different operations:
//
//   - Commit finishes the stream durably, and is the source's commit point:
//     once it returned nil the stream is complete where it went, and the
//     source must never resume its guest on its own.
//   - Close, without a successful Commit before it, aborts: a file: save is
//     discarded (its temporary file removed, the previous file at PATH left
//     untouched), an exec: command's process group is killed at once.
//
// What Commit does per transport:
//
//	file:PATH           fsync the temporary file, close it, rename it over
//	                    PATH, fsync PATH's directory
//	file:PATH,offset=N  fsync the file (written in place), close it
//	exec:               close the command's stdin and wait for it to exit;
//	                    success is exit status 0. A command still running
//	                    when ctx ends is killed, and the error says so
//	fd:                 a regular file: fsync it; a pipe, socket or device:
//	                    nothing to sync (whether the reader got the bytes
//	                    cannot be known without a return path). Then close
//
// Commit is called at most once, by the goroutine that wrote the stream; a
// Close from another goroutine (a cancel) may race with it, and then exactly
// one wins: either Commit returns nil and Close does nothing, or Commit
// returns an error and the stream is aborted. ctx bounds every wait Commit
// makes (an fsync still running when ctx ends finishes in the background;
// its result is then ignored).
//
// Every error Commit returns is a *CommitError wrapping ErrNotDurable: the
// stream did not reach its commit point, and the source may resume its
// guest. After an error, call Close to release the channel.
type Committer interface {
	Commit(ctx context.Context) error
}

// ErrNotDurable is wrapped by every error a Committer's Commit returns: the
// stream did not become durable, so the migration has failed before its
// commit point.
var ErrNotDurable = errors.New("the stream did not become durable")

// CommitError reports why Commit could not make a stream durable. It wraps
// both ErrNotDurable and the cause (errors.As finds an exec: command's
// *CommandError in it; errors.Is finds syscall.ENOSPC, context.Canceled,
// net.ErrClosed for a Commit that a Close aborted, ...).
type CommitError struct {
	Addr Addr   // the channel's address
	Op   string // the step that failed: "fsync", "close", "rename", "fsync directory", "wait for the command", ...
	Err  error  // the cause
}

// Error formats as "commit file:/x: fsync /x/.y.migctl-123.tmp: input/output error".
func (e *CommitError) Error() string {
	return "commit " + e.Addr.String() + ": " + e.Op + ": " + e.Err.Error()
}

// Unwrap returns ErrNotDurable and the cause.
func (e *CommitError) Unwrap() []error { return []error{ErrNotDurable, e.Err} }

// syncFile fsyncs f unless ctx ends first. fsync cannot be interrupted, so it
// runs in a goroutine of its own that holds only f; a Close of f meanwhile is
// safe (the descriptor is released when the fsync returns).
func syncFile(ctx context.Context, f *os.File) error {
	if err := ctx.Err(); err != nil {
		return context.Cause(ctx)
	}
	done := make(chan error, 1)
	go func() { done <- f.Sync() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// syncDir fsyncs the directory dir, so that a rename in it survives a crash.
// A filesystem that cannot sync directories (EINVAL: some network and FUSE
// filesystems) is taken at its word: there is nothing more to do.
func syncDir(ctx context.Context, dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := syncFile(ctx, d); err != nil && !errors.Is(err, syscall.EINVAL) {
		return err
	}
	return nil
}

// saveTarget decides how file:PATH (no offset) is written: atomic reports
// whether through a temporary file renamed over target, which is PATH with
// symbolic links resolved (a save through a link replaces the file the link
// names, and the link stays). It is not atomic when PATH names something
// other than a regular file (a device such as /dev/null: written in place),
// or is a dangling symbolic link (written in place: opening it creates the
// file it names). old is PATH's file, nil when there is none.
func saveTarget(path string) (target string, old os.FileInfo, atomic bool, err error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if lfi, lerr := os.Lstat(path); lerr == nil && lfi.Mode()&os.ModeSymlink != 0 {
			return path, nil, false, nil
		}
		return path, nil, true, nil
	case err != nil:
		return "", nil, false, err
	case !fi.Mode().IsRegular():
		return path, fi, false, nil
	}
	target, err = filepath.EvalSymlinks(path)
	if err != nil {
		return "", nil, false, err
	}
	return target, fi, true, nil
}

// maxTempBase bounds how much of PATH's name goes into the temporary file's
// name, which must fit NAME_MAX (255 bytes) with the prefix and suffix.
const maxTempBase = 200

// createSave creates the temporary file a file:PATH save is written to, in
// target's directory (a rename never crosses filesystems): named
// ".NAME.migctl-RANDOM.tmp", created exclusively with mode 0600 and opened
// read-write (mapped-ram reads back what it wrote). It takes old's
// permission bits, and its owner and group where the process may set them.
func createSave(a Addr, target string, old os.FileInfo) (*saveFile, error) {
	dir, base := filepath.Dir(target), filepath.Base(target)
	if len(base) > maxTempBase {
		base = base[:maxTempBase]
	}
	f, err := os.CreateTemp(dir, "."+base+".migctl-*.tmp")
	if err != nil {
		return nil, fmt.Errorf("create the temporary file the save is written to before it replaces %s (the directory must be writable; exec:cat > %s writes in place instead): %w", target, target, err)
	}
	if old != nil {
		err := f.Chmod(old.Mode().Perm())
		if st, ok := old.Sys().(*syscall.Stat_t); ok && err == nil && (int(st.Uid) != os.Geteuid() || int(st.Gid) != os.Getegid()) {
			// Only a privileged process may give a file away; otherwise
			// the new file belongs to this process's user.
			if cerr := f.Chown(int(st.Uid), int(st.Gid)); cerr != nil && !errors.Is(cerr, syscall.EPERM) {
				err = cerr
			}
		}
		if err != nil {
			f.Close()
			os.Remove(f.Name())
			return nil, err
		}
	}
	return &saveFile{fileConn: &fileConn{f: f, addr: a, canWrite: true, regular: true}, path: target, tmp: f.Name()}, nil
}

// saveState is where a saveFile is in its life.
type saveState int

const (
	saveOpen      saveState = iota // being written
	saveCommitted                  // renamed over PATH: Close does nothing
	saveClosed                     // aborted: the temporary file is gone
)

// saveFile is the outgoing channel of file:PATH without an offset: the
// stream goes to a temporary file next to PATH, which Commit renames over
// PATH and Close (before a Commit) removes. Everything else, Unwrap
// included, is the embedded fileConn's: the temporary *os.File, which can
// be written at any offset, sought and truncated like PATH itself.
//
// mu serialises Commit's rename with Close's removal and guards state.
type saveFile struct {
	*fileConn
	path string // the file the save replaces (PATH, symbolic links resolved)
	tmp  string // the temporary file

	mu    sync.Mutex
	state saveState
}

// Commit makes the save durable and gives it PATH's name (see Committer).
func (s *saveFile) Commit(ctx context.Context) error {
	s.mu.Lock()
	st := s.state
	s.mu.Unlock()
	switch st {
	case saveCommitted:
		return nil
	case saveClosed:
		return s.fail("commit", fmt.Errorf("the channel was closed (the save was aborted): %w", net.ErrClosed))
	}
	if err := syncFile(ctx, s.f); err != nil {
		return s.fail("fsync "+s.tmp, err)
	}
	// Closing reports what a network filesystem could not write back.
	if err := s.f.Close(); err != nil {
		return s.fail("close "+s.tmp, err)
	}
	s.mu.Lock()
	if s.state != saveOpen {
		s.mu.Unlock()
		return s.fail("rename", fmt.Errorf("the channel was closed (the save was aborted): %w", net.ErrClosed))
	}
	if ctx.Err() != nil {
		s.mu.Unlock()
		return s.fail("rename", context.Cause(ctx))
	}
	if err := os.Rename(s.tmp, s.path); err != nil {
		s.mu.Unlock()
		return s.fail("rename", err)
	}
	s.state = saveCommitted
	s.mu.Unlock()
	if err := syncDir(ctx, filepath.Dir(s.path)); err != nil {
		return s.fail("fsync directory", fmt.Errorf("%w (%s already names the new save, but after a crash it may name the previous one again)", err, s.path))
	}
	return nil
}

func (s *saveFile) fail(op string, err error) error {
	return &CommitError{Addr: s.addr, Op: op, Err: err}
}

// Close aborts a save that was not committed: it closes and removes the
// temporary file, leaving PATH as it was. After a successful Commit it does
// nothing.
func (s *saveFile) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != saveOpen {
		return nil
	}
	s.state = saveClosed
	err := ignoreClosed(s.f.Close()) // Commit may have closed it
	if rerr := os.Remove(s.tmp); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	return err
}

// Commit syncs a regular file written in place (file:PATH,offset=N, an fd:
// file) and closes the channel; for a pipe, socket or device it only closes.
// On the incoming side it is Close. See Committer.
func (c *fileConn) Commit(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return &CommitError{Addr: c.addr, Op: "commit", Err: context.Cause(ctx)}
	}
	if c.canWrite && c.regular {
		if err := syncFile(ctx, c.f); err != nil {
			return &CommitError{Addr: c.addr, Op: "fsync", Err: err}
		}
	}
	if err := c.f.Close(); err != nil {
		return &CommitError{Addr: c.addr, Op: "close", Err: err}
	}
	c.committed.Store(true)
	return nil
}

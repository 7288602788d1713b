// Package transport parses migration URIs and opens the byte channels a
// migration runs over.
//
// A migration address is written the way QEMU writes it, as a URI
// (tcp:HOST:PORT, unix:PATH, fd:N, file:PATH[,offset=N], exec:CMDLINE,
// rdma:HOST:PORT, vsock:CID:PORT) or as QMP's MigrationAddress JSON object.
// [Parse] and [FromChannel] turn either into an [Addr]; [Addr.String] gives
// the canonical URI back.
//
// The source side calls [Dial] to open its channel; the destination calls
// [Listen] and then [Listener.Accept]. Both return a [Conn]: an
// io.ReadWriteCloser that also knows how to half-close, whether it has a
// return path (a channel back from destination to source), and its address.
// [Config] carries the knobs (a resolver for named fds, socket buffer sizes);
// the package-level [Dial] and [Listen] use the zero Config.
//
// The package moves bytes and nothing else: it never parses the migration
// stream and knows nothing about capabilities. Which transport suits which
// capability (multi-channel, seekable, extra fds) is declared in the spec and
// checked by the guards; the key they use is [Addr.Scheme].
//
// # Ownership
//
// A Conn owns every descriptor, goroutine and child process it uses (and a
// file: save's temporary file); Close releases them all, also after a
// failure, and never waits for a peer or for a command to finish. A Listener
// owns its socket (and, for unix:, the socket file it created); Close
// releases them. Connections already accepted are independent of the
// Listener. Dial and Listen release everything they acquired when they fail.
// For fd: addresses the descriptor passes to the transport only on success;
// on error it stays the caller's.
//
// # One-way transports: commit or abort
//
// file:, exec: and fd: on a pipe or file have no return path: the source
// cannot hear from a destination, so the stream itself must say whether it
// was finished. Their outgoing Conns implement [Committer]: Commit finishes
// the stream durably and is the source's commit point (file: fsync, rename
// over PATH, fsync of the directory; exec: stdin closed and the command
// exited 0; fd: fsync of a regular file, then close), while Close without a
// successful Commit aborts it (file: the temporary file is removed and PATH
// left as it was; exec: the process group is killed at once). Every Commit
// failure wraps [ErrNotDurable]. A file:PATH save is therefore atomic: PATH
// names either the previous file or the complete new save, never a part of
// one. Saves written in place are not atomic: file:PATH,offset=N, file:
// naming a device, and fd:.
//
// # Zero copy
//
// The Conns returned here implement io.ReaderFrom and io.WriterTo by handing
// the copy to the underlying *net.TCPConn, *net.UnixConn or *os.File, so
// io.Copy between two Conns (or a Conn and an *os.File) keeps the kernel's
// splice/sendfile/copy_file_range paths. Unwrap returns the underlying object
// for callers that need it directly.
//
// rdma: and vsock: addresses parse but do not open yet: Dial and Listen
// return an error wrapping [ErrUnsupported].
package transport

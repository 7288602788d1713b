package qmp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/internal/safe"
	"github.com/migctl/migctl/transport"
)

// Privilege is what a control client may do. It is decided per
// connection by the listener the connection came in on, never by anything
// the client says about itself.
type Privilege int

const (
	// LocalUser is a client of a TCP control socket without client
	// authentication. The socket is on a loopback address, so the client is
	// any user of this host: it gets network migrations (tcp:, rdma:,
	// vsock:), unix: and file: paths under the migration directory, and
	// fd:NAME; never exec: and never an arbitrary path ([Policy]).
	LocalUser Privilege = iota
	// Owner is a client of the unix control socket (mode 0600: the
	// server's own user, or root) or of a TCP socket whose clients
	// authenticate with a TLS certificate: every command, every address.
	Owner
)

func (p Privilege) String() string {
	if p == Owner {
		return "owner"
	}
	return "local-user"
}

// localUserWhy says why a LocalUser client is limited, in refusals.
const localUserWhy = "this client came in on a TCP control socket without client authentication, which every local user can connect to"

// Policy is what LocalUser clients may migrate to and from. The zero
// Policy allows them network migrations and fd:NAME only.
type Policy struct {
	// MigrationDir is the absolute directory under which LocalUser clients
	// may use unix: and file: addresses (serve --migration-dir), as
	// CheckMigrationDir returned it; "" allows them none.
	MigrationDir string
}

// TrustError is a migration address refused for a client's privilege. Its
// message names the address, the rule and what to change.
type TrustError struct {
	Command string // migrate or migrate-incoming
	Addr    string // the address as the client gave it (canonical form)
	Reason  string
}

func (e *TrustError) Error() string {
	return fmt.Sprintf("%s %s is refused on this connection: %s", e.Command, e.Addr, e.Reason)
}

// Check decides whether a client with privilege p may use address a with
// command cmd (migrate or migrate-incoming): nil allows it. An Owner may
// use every address. A LocalUser may use tcp:, rdma: and vsock:; fd:NAME
// (a descriptor the owner registered with getfd); unix: and file: with an
// absolute path strictly under MigrationDir (judged on the path's text:
// see Server for the check of symbolic links). Everything else is refused:
// exec: (a shell command run as the server's user), fd:N (any descriptor
// the server holds), other paths, unknown schemes.
func (pol Policy) Check(p Privilege, cmd string, a transport.Addr) error {
	if p >= Owner {
		return nil
	}
	refuse := func(format string, args ...any) error {
		return &TrustError{Command: cmd, Addr: a.String(), Reason: fmt.Sprintf(format, args...) + "; " + localUserWhy +
			" (send it over the unix control socket, or authenticate with a TLS client certificate: serve --qmp-tls-creds)"}
	}
	switch a.Scheme {
	case transport.SchemeTCP, transport.SchemeRDMA, transport.SchemeVsock:
		return nil
	case transport.SchemeFD:
		if a.FDName != "" {
			return nil
		}
		return refuse("fd:%d names a descriptor by number, which could be any descriptor the server holds; register the descriptor with getfd over the unix control socket and use fd:NAME", a.FD)
	case transport.SchemeExec:
		return refuse("exec: runs a shell command as the server's user")
	case transport.SchemeUnix, transport.SchemeFile:
		if pol.MigrationDir == "" {
			return refuse("%s: paths are allowed only under a migration directory, and serve was started without --migration-dir", a.Scheme)
		}
		if !Under(pol.MigrationDir, a.Path) {
			return refuse("%s: paths must lie under the migration directory %s (serve --migration-dir), written as an absolute path without '..'; %q does not", a.Scheme, pol.MigrationDir, a.Path)
		}
		return nil
	}
	return refuse("the %s: transport is not one of those allowed here (tcp:, rdma:, vsock:, fd:NAME, and unix: or file: under --migration-dir)", a.Scheme)
}

// Under reports whether path, as written, names something strictly inside
// dir: path is absolute, has no '..' element and no '.' or empty element
// that cleaning would remove, and starts with dir followed by a slash.
// dir must be absolute and clean. It looks at the text only.
func Under(dir, path string) bool {
	if !filepath.IsAbs(path) || filepath.Clean(path) != path {
		return false
	}
	if dir == "/" {
		return path != "/"
	}
	return strings.HasPrefix(path, dir+"/")
}

// CheckMigrationDir checks a directory meant for serve --migration-dir and
// returns its absolute path with symbolic links resolved. Since LocalUser
// clients may make the server create, truncate and read files in it, it
// must be a directory that no other user can write to (mode without
// group or other write permission) owned by the server's user or root:
// otherwise another user could plant a symbolic link there that points
// anywhere.
func CheckMigrationDir(dir string) (string, error) {
	if dir == "" {
		return "", errors.New("--migration-dir: the path is empty")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("--migration-dir %s: %w", dir, err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return "", fmt.Errorf("--migration-dir %s: %w", dir, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(real, &st); err != nil {
		return "", fmt.Errorf("--migration-dir %s: %w", dir, err)
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return "", fmt.Errorf("--migration-dir %s is not a directory", real)
	case st.Uid != uint32(os.Geteuid()) && st.Uid != 0:
		return "", fmt.Errorf("--migration-dir %s belongs to uid %d, not to this user (%d) or root: another user could replace what migctl writes there; use a directory of your own", real, st.Uid, os.Geteuid())
	case st.Mode&0o022 != 0:
		return "", fmt.Errorf("--migration-dir %s is writable by its group or by others (mode %04o): they could plant symbolic links there; chmod go-w it, or use a private directory", real, st.Mode&0o7777)
	}
	return real, nil
}

// checkResolved is the Server's second look at a unix: or file: address
// that Policy.Check allowed a LocalUser: the directory holding the path,
// with symbolic links resolved, must still be under the migration
// directory, and the path itself must not be a symbolic link. (The
// migration directory itself is writable only by the server's user, as
// CheckMigrationDir ensured; subdirectories others can write to are the
// operator's doing.)
func (pol Policy) checkResolved(p Privilege, cmd string, a transport.Addr) error {
	if p >= Owner || (a.Scheme != transport.SchemeUnix && a.Scheme != transport.SchemeFile) {
		return nil
	}
	refuse := func(format string, args ...any) error {
		return &TrustError{Command: cmd, Addr: a.String(), Reason: fmt.Sprintf(format, args...) + "; " + localUserWhy}
	}
	parent, err := filepath.EvalSymlinks(filepath.Dir(a.Path))
	if err != nil {
		return refuse("its directory cannot be resolved: %v", err)
	}
	if parent != pol.MigrationDir && !Under(pol.MigrationDir, parent) {
		return refuse("its directory resolves to %s, outside the migration directory %s (a symbolic link)", parent, pol.MigrationDir)
	}
	if fi, err := os.Lstat(a.Path); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		return refuse("%s is a symbolic link", a.Path)
	}
	return nil
}

// checkMigration applies the trust policy to every address of a migrate
// or migrate-incoming request, before the Host is called: Policy.Check,
// then for a LocalUser's unix: or file: path the resolved check, and for
// fd: that the server's table holds the descriptor.
func (s *Server) checkMigration(cl *client, cmd string, addrs []transport.Addr) *Error {
	for _, a := range addrs {
		err := s.pol.Check(cl.priv, cmd, a)
		if err == nil {
			err = s.pol.checkResolved(cl.priv, cmd, a)
		}
		if err == nil && a.Scheme == transport.SchemeFD {
			err = s.fds.check(a)
		}
		if err != nil {
			if cl.priv < Owner {
				s.log.Warn("qmp: refused a migration address to a client of an unauthenticated TCP socket", "remote", remoteName(cl.conn), "command", cmd, "addr", a.String())
			}
			return genericf("%s", err.Error())
		}
	}
	return nil
}

// checkSocketDir refuses to create a control socket in a directory that
// another user could use to replace it (and so receive the owner's
// commands and descriptors): one that belongs to another user (root
// aside), or that its group or others can write to without the sticky bit
// (with it, as in /tmp, only the socket's owner may remove the socket).
func checkSocketDir(path string) error {
	dir := filepath.Dir(path)
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return fmt.Errorf("QMP socket %s: its directory: %w", path, err)
	}
	switch {
	case st.Uid != uint32(os.Geteuid()) && st.Uid != 0:
		return fmt.Errorf("QMP socket %s: the directory %s belongs to uid %d, who could replace the socket and receive your commands; put the socket in a directory of your own", path, dir, st.Uid)
	case st.Mode&0o022 != 0 && st.Mode&unix.S_ISVTX == 0:
		return fmt.Errorf("QMP socket %s: the directory %s is writable by its group or by others (mode %04o) and has no sticky bit, so they could replace the socket; use a private directory (or chmod go-w, or +t)", path, dir, st.Mode&0o7777)
	}
	return nil
}

// controlTLS builds the TLS configuration of a control socket whose
// clients authenticate with certificates.
func controlTLS(x *creds.X509, authz creds.Authorizer) (*tls.Config, error) {
	if x.Endpoint() != creds.Server {
		return nil, fmt.Errorf("the TLS credentials %q have endpoint=%s; a control socket needs endpoint=server (server-cert.pem, server-key.pem)", x.ID(), x.Endpoint())
	}
	if !x.VerifyPeer() {
		return nil, fmt.Errorf("the TLS credentials %q have verify-peer=off: without client certificates every local user could still connect; turn verify-peer on", x.ID())
	}
	return x.ServerConfig(authz)
}

// handshake runs the server side of the TLS handshake of a control
// connection, bounded by NegotiationTimeout and by the server's Close.
// On success the client's requests and replies go through the TLS
// connection; on failure the client is dropped (the reader's defers).
func (cl *client) handshake() bool {
	ctx, cancel := context.WithTimeout(cl.s.ctx, cl.s.opts.NegotiationTimeout)
	defer cancel()
	tc, err := creds.ServerHandshake(ctx, cl.conn, cl.tls)
	if err != nil {
		cl.s.log.Info("qmp: TLS client refused", "remote", remoteName(cl.conn), "err", err)
		return false
	}
	if cs := tc.ConnectionState(); len(cs.PeerCertificates) > 0 {
		dn, _ := creds.DN(cs.PeerCertificates[0])
		cl.s.log.Info("qmp: TLS client authenticated", "remote", remoteName(cl.conn), "dn", safe.Printable(dn, 256))
	}
	cl.rw = tc
	close(cl.up)
	return true
}

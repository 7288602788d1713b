// Package qmp is migctl's control plane on the wire: a server that speaks
// the QEMU Machine Protocol (QMP) as QEMU does for migration, so that
// existing QMP clients (libvirt-style tools, go-qemu, scripts) drive migctl
// unchanged, and a small client for migctl's own command line.
//
// # Protocol
//
// A client connects to a unix socket (or a loopback TCP port) and reads the
// greeting:
//
//	{"QMP":{"version":{"qemu":{"micro":0,"minor":2,"major":10},"package":"migctl"},"capabilities":["oob"]}}
//
// It must send {"execute":"qmp_capabilities"} before anything else: until
// then every other command fails with class CommandNotFound and no event is
// delivered. Requests are JSON objects {"execute": NAME, "arguments": {…},
// "id": ANY}; they need not be newline-terminated (the server splits the
// byte stream into JSON values itself). Every server message is one JSON
// object terminated by CRLF: {"return": …, "id": …} on success,
// {"error":{"class":"GenericError","desc":…}, "id": …} on failure, and
// {"event":…, "data":…, "timestamp":{"seconds":…,"microseconds":…}} for
// events. The id is echoed verbatim (any JSON value); a request that is not
// JSON gets an error without id.
//
// Commands keep QEMU's names and argument shapes (migrate, migrate-incoming,
// migrate-set-capabilities, query-migrate, migrate_cancel, …); the list is
// in [Commands]. migctl's own additions are extra commands whose names
// start with query-migctl- (stable) or x-migctl- (unstable, as QEMU's x-
// commands); no QEMU shape is changed. human-monitor-command answers the
// HMP commands an operator types about migration (info migrate, info
// migrate_capabilities, info migrate_parameters, info status, …) in
// QEMU's text, so QEMU's qmp-shell -H works (hmp.go). Events MIGRATION and
// MIGRATION_PASS are emitted, as in QEMU, only while the capability events
// is on.
//
// # Input, as strictly as QEMU reads it
//
// Go's encoding/json accepts duplicate keys (the last wins) and invalid
// UTF-8, so it is not the check: strict.go is. A request with a duplicate
// key in any object, a raw control character (U+0000–U+001F) in a string,
// invalid UTF-8 (or a noncharacter, or a \u escape naming a surrogate or
// noncharacter), or nesting deeper than 1024 (QEMU's MAX_NESTING) is one
// GenericError with QEMU's text ("JSON parse error, duplicate key", "JSON
// nesting depth limit exceeded", …) and no id: an id is echoed only from a
// request that is strict JSON, so a reply is always valid UTF-8 and valid
// JSON. QEMU's single-quoted strings are not accepted.
//
// One malformed input gets one error. After a lexical error (which ends the
// broken value where QEMU's lexer ends it: at the control character, so an
// unterminated string cannot swallow the next requests) or a top-level
// value that is not an object, the server skips input up to the next '{'.
// A megabyte of ']' is one error. Each reply therefore answers one object
// or one run of bytes between objects. QEMU's documented reset (a control
// character other than \t, \r, \n, or the byte 0xFF) works.
//
// Every error desc is bounded (MaxDesc) and made printable
// (internal/safe), since it may quote what a client sent.
//
// # Limits
//
// Options bound what connections cost: MaxRequest (one request, default 1
// MiB: a longer one is an error and the client is dropped), MaxClients
// (default 256), MaxPending (clients not yet through qmp_capabilities,
// default 16: one more drops the one that waited longest, so idle
// connections never lock an operator out) and NegotiationTimeout (default
// 30 s from connecting to a successful qmp_capabilities).
//
// # Trust
//
// What a client may do is decided by the listener it came in on
// ([Privilege]): the unix socket (mode 0600, refused in a directory others
// could replace it in) and a TCP socket whose clients present a TLS
// certificate ([Server.ListenWith]) give [Owner], who may do everything; a
// plain loopback TCP socket gives [LocalUser] (any user of the host; a
// warning is logged), limited by [Policy] to network migrations, fd:NAME
// and unix:/file: paths under Options.MigrationDir, before the Host is
// called. docs/protocol.md ("Trust model") has the whole picture.
//
// # Objects and descriptors
//
// object-add and object-del keep QEMU's shapes for the objects package
// creds implements (TLS credentials, authorization lists), in one
// registry per process (Options.Objects) that the controller's
// tls-objects guard also sees ([GuardObjects]). getfd and closefd keep
// descriptors passed with SCM_RIGHTS over the unix socket in the server's
// [FDTable], from which fd: addresses are resolved (it is the transports'
// transport.Descriptors); fd:N names only descriptors inherited at startup
// ([FDTable.Inherit]).
//
// # Concurrency
//
// A [Server] has one goroutine per listener (accepting), two per client (a
// reader that runs that client's commands in order, and a writer that owns
// the connection's write side and drains a bounded queue), and one that
// turns the controller's events into QMP events. The server never holds
// the controller lock: it only calls [machine.Controller] methods, each of
// which takes and releases it. A client whose queue fills up (it does not
// read its events) is dropped alone; the others and any running migration
// are unaffected.
//
// The server does not own the guest or the migrations: a [Host] does.
// [GuestHost] is the host migctl serve uses: it runs outgoing migrations
// with package engine and incoming ones with package loaders on one
// guest.Guest.
package qmp

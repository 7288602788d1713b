package guards

import (
	"fmt"
	"slices"

	"github.com/migctl/migctl/spec"
)

// Object types and endpoints the tls-objects guard knows (QEMU's names).
const (
	objTLSCredsX509 = "tls-creds-x509"
	objAuthzList    = "authz-list"
	objAuthzSimple  = "authz-simple"
	endpointClient  = "client"
	endpointServer  = "server"
)

// TLS parameters the guard reads.
const (
	paramTLSCreds    = "tls-creds"
	paramTLSHostname = "tls-hostname"
	paramTLSAuthz    = "tls-authz"
)

// hostTransports are the transports whose address has a host name a TLS
// client can check the server's certificate against.
var hostTransports = []string{"tcp", "rdma"}

// tlsObjects checks, when a migration starts or is under way, that the
// TLS parameters name objects that exist and fit this side: tls-creds a
// tls-creds-x509 object with endpoint client on the source and server on
// the destination; on the destination, tls-authz an authz-list or
// authz-simple object, with credentials that verify the peer (the name in
// an unverified certificate proves nothing); on the source, with
// verify-peer on, a host name to check the destination's certificate
// against (tls-hostname, or the host of a tcp: or rdma: address). The
// messages are QEMU's where QEMU has one (migration/tls.c, authz/base.c).
//
// It judges nothing while no transport is known (the side is idle: the
// parameters are strings until a migration uses them, as in QEMU), nor a
// configuration change that leaves the TLS parameters alone.
func tlsObjects(in *Input) error {
	if in.Transport == nil {
		return nil
	}
	if in.Change != nil && !slices.ContainsFunc([]string{paramTLSCreds, paramTLSHostname, paramTLSAuthz},
		func(p string) bool { _, ok := in.Change.Params[p]; return ok }) {
		return nil
	}
	id := in.Config.Params[paramTLSCreds]
	if id == "" {
		return nil
	}
	want := endpointClient
	if in.Side == spec.Incoming {
		want = endpointServer
	}
	var rs []Refusal
	obj, found := in.Objects[id]
	switch {
	case !found:
		rs = append(rs, Refusal{Reason: fmt.Sprintf("No TLS credentials with id '%s': add them with object-add (qom-type %s, endpoint=%s) before the migration starts, or clear tls-creds", id, objTLSCredsX509, want)})
	case obj.Type != objTLSCredsX509:
		rs = append(rs, Refusal{Reason: fmt.Sprintf("Object with id '%s' is not TLS credentials (its qom-type is %s): set tls-creds to a %s object", id, obj.Type, objTLSCredsX509)})
	case obj.Endpoint != want:
		rs = append(rs, Refusal{Reason: fmt.Sprintf("Expected TLS credentials for a %s endpoint: tls-creds '%s' has endpoint=%s; the %s side of a migration uses endpoint=%s", want, id, obj.Endpoint, in.Side, want)})
	}
	if in.Side == spec.Incoming {
		if az := in.Config.Params[paramTLSAuthz]; az != "" {
			a, ok := in.Objects[az]
			switch {
			case !ok:
				rs = append(rs, Refusal{Reason: fmt.Sprintf("Cannot find QAuthZ object ID %s: add it with object-add (qom-type %s or %s), or clear tls-authz", az, objAuthzList, objAuthzSimple)})
			case a.Type != objAuthzList && a.Type != objAuthzSimple:
				rs = append(rs, Refusal{Reason: fmt.Sprintf("Object '%s' is not a QAuthZ subclass (its qom-type is %s): set tls-authz to an %s or %s object", az, a.Type, objAuthzList, objAuthzSimple)})
			case found && obj.Type == objTLSCredsX509 && !obj.VerifyPeer:
				rs = append(rs, Refusal{Reason: fmt.Sprintf("tls-authz '%s' needs verify-peer=on in tls-creds '%s': the name in an unverified certificate proves nothing", az, id)})
			}
		}
	} else if found && obj.Type == objTLSCredsX509 && obj.VerifyPeer && in.Config.Params[paramTLSHostname] == "" &&
		!slices.Contains(hostTransports, in.Transport.Transport) {
		rs = append(rs, Refusal{Reason: fmt.Sprintf("No hostname available for TLS: a %s: address has no host name to check the destination's certificate against; set the parameter tls-hostname to a name in that certificate", in.Transport.Transport)})
	}
	if len(rs) > 0 {
		return refuse(TLSObjects, rs...)
	}
	return nil
}

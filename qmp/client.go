package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// MaxReply bounds one server message the Client reads (16 MiB): far more
// than any migctl reply, and than QEMU's largest (query-qmp-schema).
const MaxReply = 16 << 20

// Client is a QMP client: it negotiates capabilities, matches replies to
// commands by id (so several goroutines may run commands at once), and
// delivers events on a channel.
type Client struct {
	conn     net.Conn
	greeting Greeting
	events   chan Event
	nextID   atomic.Uint64
	lost     atomic.Uint64

	// mu guards pending, anon and err; the read goroutine is the only
	// one that completes them.
	mu      sync.Mutex
	pending map[string]chan result // by compact id
	anon    []chan result          // requests sent without an id, oldest first
	err     error                  // why the connection ended
	done    chan struct{}          // closed when the read goroutine ends
}

type result struct {
	line []byte
	err  error
}

// DialAddr connects to a QMP server at addr (unix:PATH, tcp:HOST:PORT, or
// a bare path meaning a unix socket), reads the greeting and negotiates
// capabilities. Events are delivered on Events from then on.
func DialAddr(ctx context.Context, addr string) (*Client, error) {
	network, address := "unix", addr
	if scheme, rest, ok := strings.Cut(addr, ":"); ok && (scheme == "unix" || scheme == "tcp") {
		network, address = scheme, rest
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("connect to the QMP socket %s: %w (is `migctl serve --qmp %s` running?)", address, err, addr)
	}
	c, err := NewClient(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// NewClient runs the handshake on an open connection. The client owns conn
// from here on (Close closes it).
func NewClient(ctx context.Context, conn net.Conn) (*Client, error) {
	c := &Client{
		conn:    conn,
		events:  make(chan Event, 1024),
		pending: map[string]chan result{},
		done:    make(chan struct{}),
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	line, err := readLine(r)
	if err != nil {
		stop()
		return nil, fmt.Errorf("read the QMP greeting: %w", err)
	}
	if err := json.Unmarshal(line, &c.greeting); err != nil || c.greeting.QMP.Capabilities == nil {
		stop()
		return nil, fmt.Errorf("not a QMP server: first message %.200q", line)
	}
	stop()
	go c.read(r)
	if _, err := c.Execute(ctx, "qmp_capabilities", nil); err != nil {
		c.Close()
		return nil, fmt.Errorf("QMP capabilities negotiation: %w", err)
	}
	return c, nil
}

// Greeting returns the server's greeting.
func (c *Client) Greeting() Greeting { return c.greeting }

// Events delivers the server's events. It is closed when the connection
// ends. Events that arrive while it is full (1024 waiting) are lost and
// counted by LostEvents.
func (c *Client) Events() <-chan Event { return c.events }

// LostEvents returns how many events were dropped because Events was full.
func (c *Client) LostEvents() uint64 { return c.lost.Load() }

// Done is closed when the connection has ended; Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the connection ended, or nil while it is up.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection and waits for the read goroutine.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// readLine reads one CRLF- or LF-terminated line of at most MaxReply bytes.
func readLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, err := r.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > MaxReply {
			return nil, fmt.Errorf("a server message exceeds %d bytes", MaxReply)
		}
		if err == nil {
			return bytes.TrimRight(line, "\r\n"), nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return nil, err
		}
	}
}

// message is what the read goroutine looks at in each line.
type message struct {
	Event  string          `json:"event"`
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
	ID     json.RawMessage `json:"id"`
}

func (c *Client) read(r *bufio.Reader) {
	var err error
	defer func() {
		c.mu.Lock()
		if err == nil {
			err = errors.New("connection closed")
		}
		c.err = err
		for id, ch := range c.pending {
			ch <- result{err: err}
			delete(c.pending, id)
		}
		for _, ch := range c.anon {
			ch <- result{err: err}
		}
		c.anon = nil
		c.mu.Unlock()
		close(c.events)
		close(c.done)
	}()
	for {
		var line []byte
		line, err = readLine(r)
		if err != nil {
			return
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var m message
		if jerr := json.Unmarshal(line, &m); jerr != nil {
			err = fmt.Errorf("the server sent a malformed message %.200q: %w", line, jerr)
			return
		}
		if m.Event != "" {
			var ev Event
			if json.Unmarshal(line, &ev) == nil {
				select {
				case c.events <- ev:
				default:
					c.lost.Add(1)
				}
			}
			continue
		}
		c.complete(m.ID, line)
	}
}

// complete hands a reply to the request with its id (or, without id, to
// the oldest request sent without one).
func (c *Client) complete(id json.RawMessage, line []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ch chan result
	if len(id) > 0 {
		var b bytes.Buffer
		if json.Compact(&b, id) == nil {
			ch = c.pending[b.String()]
			delete(c.pending, b.String())
		}
	}
	if ch == nil && len(c.anon) > 0 {
		ch, c.anon = c.anon[0], c.anon[1:]
	}
	if ch != nil {
		ch <- result{line: line}
	}
}

// Execute runs a command with arguments (nil, a map, a struct or a
// json.RawMessage) and returns the raw "return" value. A QMP error reply
// is returned as *Error.
func (c *Client) Execute(ctx context.Context, cmd string, arguments any) (json.RawMessage, error) {
	id := "migctl-" + strconv.FormatUint(c.nextID.Add(1), 10)
	req := map[string]any{"execute": cmd, "id": id}
	if arguments != nil {
		req["arguments"] = arguments
	}
	raw, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", cmd, err)
	}
	idJSON, _ := json.Marshal(id)
	line, err := c.roundTrip(ctx, raw, string(idJSON), nil)
	if err != nil {
		return nil, err
	}
	var m message
	if err := json.Unmarshal(line, &m); err != nil {
		return nil, fmt.Errorf("%s: malformed reply %.200q: %w", cmd, line, err)
	}
	if m.Error != nil {
		return nil, m.Error
	}
	return m.Return, nil
}

// Raw sends a request as given (a JSON object) and returns the server's
// reply line as it came. A request with an id gets the reply with that id;
// one without gets the next reply without id.
func (c *Client) Raw(ctx context.Context, req []byte) ([]byte, error) {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(req, &obj); err != nil {
		return nil, fmt.Errorf("the request is not a JSON object: %w", err)
	}
	key := ""
	if id, ok := obj["id"]; ok {
		var b bytes.Buffer
		if err := json.Compact(&b, id); err != nil {
			return nil, err
		}
		key = b.String()
	}
	var b bytes.Buffer
	if err := json.Compact(&b, req); err != nil {
		return nil, err
	}
	return c.roundTrip(ctx, b.Bytes(), key, nil)
}

// roundTrip sends req (with the control message oob, on a unix socket)
// and waits for the reply with id key ("": the next reply without id).
func (c *Client) roundTrip(ctx context.Context, req []byte, key string, oob []byte) ([]byte, error) {
	ch := make(chan result, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	if key == "" {
		c.anon = append(c.anon, ch)
	} else {
		if _, dup := c.pending[key]; dup {
			c.mu.Unlock()
			return nil, fmt.Errorf("a request with id %s is already waiting for its reply", key)
		}
		c.pending[key] = ch
	}
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if key != "" {
			delete(c.pending, key)
			return
		}
		for i, x := range c.anon {
			if x == ch {
				c.anon = append(c.anon[:i], c.anon[i+1:]...)
				return
			}
		}
	}
	dl, _ := ctx.Deadline() // zero: no deadline
	_ = c.conn.SetWriteDeadline(dl)
	if err := c.write(append(req, '\n'), oob); err != nil {
		forget()
		return nil, fmt.Errorf("send to the QMP server: %w", err)
	}
	select {
	case r := <-ch:
		return r.line, r.err
	case <-ctx.Done():
		forget()
		return nil, ctx.Err()
	}
}

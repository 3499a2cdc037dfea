package appliance

import (
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"
)

// Bounds of a lingering close: enough for a client to finish sending an oversized body and read
// the 413, small enough that a misbehaving client cannot hold resources.
const (
	lingerTimeout = 2 * time.Second
	lingerBytes   = 8 << 20
)

// lingerListener makes every server-side close a lingering close. Without it, a connection closed
// while the client is still sending (a body over the limit answered 413, an aborted request) has
// unread data in its receive buffer, and the kernel answers with a RST that destroys the response
// before the client reads it. Closing the write side first and discarding what still arrives lets
// the client see the response.
type lingerListener struct{ net.Listener }

func (l lingerListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		return &lingerConn{TCPConn: tc}, nil
	}
	return c, nil
}

type lingerConn struct {
	*net.TCPConn
	once sync.Once
}

// Close sends FIN at once and finishes the close in the background, so the server's worker is
// never held by a slow client.
func (c *lingerConn) Close() error {
	var err error
	c.once.Do(func() {
		if err = c.TCPConn.CloseWrite(); err != nil {
			err = c.TCPConn.Close()
			return
		}
		go func() {
			_ = c.TCPConn.SetReadDeadline(time.Now().Add(lingerTimeout))
			_, _ = io.CopyN(io.Discard, c.TCPConn, lingerBytes)
			_ = c.TCPConn.Close()
		}()
	})
	return err
}

// umaskMu serialises changes of the process-wide umask.
var umaskMu sync.Mutex

// listenUnixPrivate creates a Unix socket that only the owner can connect to from the moment it
// exists: the umask is narrowed around bind instead of chmod-ing afterwards, which would leave a
// window where anyone could connect. 077 (not 177) so that a directory another goroutine happens to
// create meanwhile still gets its x bit; on a socket only the w bit matters for connect.
func listenUnixPrivate(path string) (net.Listener, error) {
	umaskMu.Lock()
	defer umaskMu.Unlock()
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	return net.Listen("unix", path)
}

// Default connection caps: far above what an issuer's signing traffic or the benchmarks open, low
// enough that one client cannot take every file descriptor.
const (
	DefaultMaxConns      = 10000
	DefaultMaxConnsPerIP = 1024
)

// capListener bounds concurrent connections, in total and per client IP. A connection over a cap
// is closed at once, before a byte of it is read, and Accept moves on to the next one.
type capListener struct {
	net.Listener
	total, perIP int // <= 0: no cap

	mu   sync.Mutex
	n    int
	byIP map[netip.Addr]int // only addresses with open connections, so bounded by total
}

func newCapListener(ln net.Listener, total, perIP int) *capListener {
	return &capListener{Listener: ln, total: total, perIP: perIP, byIP: map[netip.Addr]int{}}
}

func (l *capListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip := remoteIP(c)
		if l.acquire(ip) {
			return &capConn{Conn: c, l: l, ip: ip}, nil
		}
		// Refused: close without lingering, so a flood of refused connections holds nothing.
		if lc, ok := c.(*lingerConn); ok {
			_ = lc.TCPConn.Close()
		} else {
			_ = c.Close()
		}
	}
}

func (l *capListener) acquire(ip netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if (l.total > 0 && l.n >= l.total) || (l.perIP > 0 && l.byIP[ip] >= l.perIP) {
		return false
	}
	l.n++
	l.byIP[ip]++
	return true
}

func (l *capListener) release(ip netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n--
	if l.byIP[ip] <= 1 {
		delete(l.byIP, ip)
	} else {
		l.byIP[ip]--
	}
}

func remoteIP(c net.Conn) netip.Addr {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			return ip.Unmap()
		}
	}
	return netip.Addr{}
}

type capConn struct {
	net.Conn
	l    *capListener
	ip   netip.Addr
	once sync.Once
}

func (c *capConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c.ip) })
	return err
}

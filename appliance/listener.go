package appliance

import (
	"io"
	"net"
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

package appliance_test

import (
	"bufio"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

// keepAliveGet sends GET /healthz on c and reads the answer; an error means the server refused or
// closed the connection.
func keepAliveGet(c net.Conn, r *bufio.Reader) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		return err
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		return &net.AddrError{Err: resp.Status}
	}
	return nil
}

// TestConnectionCaps: with a cap of 4 (per IP, then in total), four concurrent keep-alive
// connections are served, the fifth is closed without an answer, and a slot freed by closing one
// connection is usable again.
func TestConnectionCaps(t *testing.T) {
	for name, tweak := range map[string]func(*appliance.Options){
		"per-ip": func(o *appliance.Options) { o.MaxConnsPerIP = 4 },
		"total":  func(o *appliance.Options) { o.MaxConns = 4 },
	} {
		t.Run(name, func(t *testing.T) {
			in := apptest.Start(t, apptest.Options{Tweak: tweak})
			addr := strings.TrimPrefix(in.URL, "http://")
			dial := func() (net.Conn, *bufio.Reader) {
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				return c, bufio.NewReader(c)
			}
			var conns []net.Conn
			for i := range 4 {
				c, r := dial()
				if err := keepAliveGet(c, r); err != nil {
					t.Fatalf("connection %d within the cap: %v", i+1, err)
				}
				conns = append(conns, c)
			}
			c5, r5 := dial()
			if err := keepAliveGet(c5, r5); err == nil {
				t.Fatal("the fifth concurrent connection was served")
			}
			conns[0].Close()
			// The release happens when the server notices the close; give it a moment.
			deadline := time.Now().Add(5 * time.Second)
			for {
				c, r := dial()
				err := keepAliveGet(c, r)
				if err == nil {
					break
				}
				c.Close()
				if time.Now().After(deadline) {
					t.Fatalf("a freed slot is not reused: %v", err)
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

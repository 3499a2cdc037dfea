package httpkms

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// contractServer is a minimal, independent implementation of EUDIPLO's remote-KMS HTTP contract, written from
// the contract text and not from kmsgate's own server, so the http provider is proven not to depend
// on kmsgate's extensions. digest switches on the one extension (advertised in /health).
type contractServer struct {
	canImport bool
	digest    bool
	auth      func(r *http.Request) bool // nil: no auth
	tls       *tls.Config

	mu   sync.Mutex
	keys map[string]*ecdsa.PrivateKey

	calls struct{ generate, sign, health atomic.Int32 }
	// failSign makes the next n sign calls answer 503 (to test bounded retries).
	failSign atomic.Int32
	failGen  atomic.Int32

	addr string
	srv  *http.Server
}

func (cs *contractServer) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /keys", func(w http.ResponseWriter, r *http.Request) {
		cs.calls.generate.Add(1)
		if cs.failGen.Load() > 0 {
			cs.failGen.Add(-1)
			writeErr(w, http.StatusServiceUnavailable, "busy")
			return
		}
		var req struct{ Kid, Alg string }
		if json.NewDecoder(r.Body).Decode(&req) != nil || req.Kid == "" {
			writeErr(w, http.StatusBadRequest, "missing kid")
			return
		}
		if req.Alg != "" && req.Alg != "ES256" {
			writeErr(w, http.StatusBadRequest, "unsupported alg")
			return
		}
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		cs.mu.Lock()
		_, exists := cs.keys[req.Kid]
		if !exists {
			cs.keys[req.Kid] = k
		}
		cs.mu.Unlock()
		if exists {
			writeErr(w, http.StatusConflict, "kid exists")
			return
		}
		writePublic(w, k, req.Kid)
	})
	mux.HandleFunc("POST /keys/{kid}/sign", func(w http.ResponseWriter, r *http.Request) {
		cs.calls.sign.Add(1)
		if cs.failSign.Load() > 0 {
			cs.failSign.Add(-1)
			writeErr(w, http.StatusServiceUnavailable, "busy")
			return
		}
		var req struct{ Data, Digest, Alg string }
		if json.NewDecoder(r.Body).Decode(&req) != nil || (req.Data == "" && req.Digest == "") {
			writeErr(w, http.StatusBadRequest, "missing data")
			return
		}
		if req.Alg != "" && req.Alg != "ES256" {
			writeErr(w, http.StatusBadRequest, "unsupported alg")
			return
		}
		cs.mu.Lock()
		k := cs.keys[r.PathValue("kid")]
		cs.mu.Unlock()
		if k == nil {
			writeErr(w, http.StatusNotFound, "unknown key")
			return
		}
		var digest []byte
		if req.Digest != "" {
			d, err := base64.StdEncoding.DecodeString(req.Digest)
			if !cs.digest || err != nil || len(d) != 32 {
				writeErr(w, http.StatusBadRequest, "bad digest")
				return
			}
			digest = d
		} else {
			data, err := base64.StdEncoding.DecodeString(req.Data)
			if err != nil {
				writeErr(w, http.StatusBadRequest, "data is not base64")
				return
			}
			d := sha256.Sum256(data)
			digest = d[:]
		}
		der, err := ecdsa.SignASN1(rand.Reader, k, digest)
		if err != nil {
			writeErr(w, http.StatusInternalServerError, err.Error())
			return
		}
		raw, _ := keyutil.DERToRaw(der, 32)
		writeJSON(w, http.StatusOK, map[string]string{"signature": base64.RawURLEncoding.EncodeToString(raw)})
	})
	mux.HandleFunc("DELETE /keys/{kid}", func(w http.ResponseWriter, r *http.Request) {
		cs.mu.Lock()
		delete(cs.keys, r.PathValue("kid"))
		cs.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		cs.calls.health.Add(1)
		body := map[string]any{"ok": true}
		if cs.digest {
			body["extensions"] = []string{"digest"}
		}
		writeJSON(w, http.StatusOK, body)
	})
	mux.HandleFunc("POST /keys/{kid}/import", func(w http.ResponseWriter, r *http.Request) {
		if !cs.canImport {
			writeErr(w, http.StatusMethodNotAllowed, "import not supported")
			return
		}
		var req struct {
			PrivateJwk keyutil.JWK `json:"privateJwk"`
		}
		if json.NewDecoder(r.Body).Decode(&req) != nil {
			writeErr(w, http.StatusBadRequest, "bad json")
			return
		}
		k, err := keyutil.ParsePrivateJWK(req.PrivateJwk)
		if err != nil {
			writeErr(w, http.StatusBadRequest, "invalid JWK")
			return
		}
		cs.mu.Lock()
		cs.keys[r.PathValue("kid")] = k // import is an upsert (config re-import with force)
		cs.mu.Unlock()
		writePublic(w, k, r.PathValue("kid"))
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if cs.auth != nil && !cs.auth(r) {
			writeErr(w, http.StatusUnauthorized, "unauthorized")
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func writePublic(w http.ResponseWriter, k *ecdsa.PrivateKey, kid string) {
	j, _ := keyutil.PublicJWK(&k.PublicKey, kid, "ES256")
	writeJSON(w, http.StatusOK, map[string]any{"publicJwk": j})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

// start listens on 127.0.0.1 (on the previous port when restarting) and serves until stop.
func (cs *contractServer) start(t *testing.T) {
	t.Helper()
	if cs.keys == nil {
		cs.keys = map[string]*ecdsa.PrivateKey{}
	}
	addr := cs.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ { // the old socket may linger briefly after a stop
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	cs.addr = ln.Addr().String()
	if cs.tls != nil {
		ln = tls.NewListener(ln, cs.tls)
	}
	cs.srv = &http.Server{Handler: cs.handler(), ReadHeaderTimeout: 5 * time.Second}
	srv := cs.srv
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("contract server: %v", err)
		}
	}()
	t.Cleanup(func() { _ = srv.Close() })
}

func (cs *contractServer) stop() { _ = cs.srv.Close() }

func (cs *contractServer) url() string {
	if cs.tls != nil {
		return "https://" + cs.addr
	}
	return "http://" + cs.addr
}

package httpkms

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/kmsgate/kmsgate/providers"
)

// Config is the kms.json entry of an http provider.
type Config struct {
	providers.Common
	BaseURL    string `json:"baseUrl"`
	KeysPath   string `json:"keysPath,omitempty"`
	HealthPath string `json:"healthPath,omitempty"`
	CanImport  bool   `json:"canImport,omitempty"`
	// APIKey is the EUDIPLO-documented static credential, sent as "Authorization: Bearer".
	APIKey string `json:"apiKey,omitempty" secret:"true"`
	// APIKeyHeader "x-api-key" sends APIKey in that header instead (what EUDIPLO's reference
	// service checks); "" or "authorization" keeps the Bearer header.
	APIKeyHeader string      `json:"apiKeyHeader,omitempty"`
	Auth         *AuthConfig `json:"auth,omitempty"`
	// Timeout bounds every call, as a Go duration ("10s").
	Timeout string `json:"timeout,omitempty"`
	// DigestExtension forces kmsgate's digest extension on even if the remote's health response
	// does not advertise it.
	DigestExtension bool `json:"digestExtension,omitempty"`
}

// AuthConfig is the newer "auth" object.
type AuthConfig struct {
	Type         string `json:"type"`
	Token        string `json:"token,omitempty" secret:"true"`
	TokenURL     string `json:"tokenUrl,omitempty"`
	ClientID     string `json:"clientId,omitempty"`
	ClientSecret string `json:"clientSecret,omitempty" secret:"true"`
	Scope        string `json:"scope,omitempty"`
	CertFile     string `json:"certFile,omitempty"`
	KeyFile      string `json:"keyFile,omitempty"`
	CAFile       string `json:"caFile,omitempty"`
}

// Auth types.
const (
	AuthNone         = "none"
	AuthBearer       = "bearer"
	AuthOAuth2       = "oauth2-client-credentials"
	AuthMTLS         = "mtls"
	DefaultTimeout   = 10 * time.Second
	headerXAPIKey    = "x-api-key"
	headerAuthHeader = "authorization"
)

type settings struct {
	base       *url.URL
	keysURL    string // base + keysPath, no trailing slash
	healthURL  string
	canImport  bool
	timeout    time.Duration
	digestFlag bool
	header     string // header name for a static credential ("" = none)
	headerVal  string
	oauth      *AuthConfig
	tls        *tls.Config
}

func (c *Config) validate() (*settings, error) {
	s := &settings{canImport: c.CanImport, digestFlag: c.DigestExtension, timeout: DefaultTimeout}
	if c.BaseURL == "" {
		return nil, errors.New("baseUrl is required")
	}
	base := strings.TrimRight(c.BaseURL, "/")
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("baseUrl %q must be an absolute http(s) URL", c.BaseURL)
	}
	if u.User != nil {
		return nil, errors.New("baseUrl must not embed credentials; use apiKey or auth")
	}
	s.base = u
	kp, hp := c.KeysPath, c.HealthPath
	if kp == "" {
		kp = "/keys"
	}
	if hp == "" {
		hp = "/health"
	}
	if !strings.HasPrefix(kp, "/") || !strings.HasPrefix(hp, "/") {
		return nil, errors.New("keysPath and healthPath must start with /")
	}
	s.keysURL = base + strings.TrimRight(kp, "/")
	s.healthURL = base + hp
	if s.timeout, err = providers.ParseTimeout(c.Timeout, DefaultTimeout); err != nil {
		return nil, err
	}
	// mTLS authenticates the transport, an API key the caller: a remote kmsgate wants both, so
	// apiKey may accompany auth {type:"mtls"}; with every other auth type it would be ambiguous.
	if c.APIKey != "" && c.Auth != nil && c.Auth.Type != AuthMTLS {
		return nil, errors.New("apiKey and auth are mutually exclusive (except with auth type mtls); use auth {type:\"bearer\"}")
	}
	switch strings.ToLower(c.APIKeyHeader) {
	case "", headerAuthHeader:
		if c.APIKey != "" {
			s.header, s.headerVal = "Authorization", "Bearer "+c.APIKey
		}
	case headerXAPIKey:
		if c.APIKey == "" {
			return nil, errors.New("apiKeyHeader is set but apiKey is empty")
		}
		s.header, s.headerVal = "X-Api-Key", c.APIKey
	default:
		return nil, fmt.Errorf("apiKeyHeader %q: want \"authorization\" or \"x-api-key\"", c.APIKeyHeader)
	}
	if c.Auth != nil {
		if err := s.applyAuth(c.Auth); err != nil {
			return nil, fmt.Errorf("auth: %w", err)
		}
	}
	return s, nil
}

func (s *settings) applyAuth(a *AuthConfig) error {
	extra := func(allowed ...string) error {
		set := map[string]bool{"token": a.Token != "", "tokenUrl": a.TokenURL != "", "clientId": a.ClientID != "",
			"clientSecret": a.ClientSecret != "", "scope": a.Scope != "", "certFile": a.CertFile != "",
			"keyFile": a.KeyFile != "", "caFile": a.CAFile != ""}
		for _, k := range allowed {
			delete(set, k)
		}
		for k, v := range set {
			if v {
				return fmt.Errorf("field %q does not apply to type %q", k, a.Type)
			}
		}
		return nil
	}
	switch a.Type {
	case AuthNone:
		return extra()
	case AuthBearer:
		if a.Token == "" {
			return errors.New("type bearer needs token")
		}
		s.header, s.headerVal = "Authorization", "Bearer "+a.Token
		return extra("token")
	case AuthOAuth2:
		if a.TokenURL == "" || a.ClientID == "" || a.ClientSecret == "" {
			return errors.New("type oauth2-client-credentials needs tokenUrl, clientId and clientSecret")
		}
		if u, err := url.Parse(a.TokenURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("tokenUrl %q must be an absolute http(s) URL", a.TokenURL)
		}
		s.oauth = a
		return extra("tokenUrl", "clientId", "clientSecret", "scope")
	case AuthMTLS:
		if a.CertFile == "" || a.KeyFile == "" {
			return errors.New("type mtls needs certFile and keyFile")
		}
		if s.base.Scheme != "https" {
			return errors.New("type mtls needs an https baseUrl")
		}
		cert, err := tls.LoadX509KeyPair(a.CertFile, a.KeyFile)
		if err != nil {
			return fmt.Errorf("load client certificate: %w", err)
		}
		tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		if a.CAFile != "" {
			pem, err := os.ReadFile(a.CAFile)
			if err != nil {
				return fmt.Errorf("read caFile: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return fmt.Errorf("caFile %s holds no PEM certificate", a.CAFile)
			}
			tc.RootCAs = pool
		}
		s.tls = tc
		return extra("certFile", "keyFile", "caFile")
	case "":
		return errors.New("type is required (none, bearer, oauth2-client-credentials, mtls)")
	default:
		return fmt.Errorf("unknown type %q (want none, bearer, oauth2-client-credentials, mtls)", a.Type)
	}
}

// SecretFields lists the config fields (JSON names) that hold secrets, for redacted output.
func SecretFields() []string { return providers.SecretFields(Config{}) }

import AsyncHTTPClient
import Foundation
import NIOCore
import NIOPosix
import NIOSSL

/// The one way ChatBridge makes outbound HTTP clients: redirects are never followed (a redirect would
/// bypass the host allowlists and forward `api-key` or access-token headers to wherever it points), and a
/// connection that cannot be made fails at once instead of being retried until the connect timeout — the
/// dispatcher retries durably, and `chat`/`check --probe` answer quickly.
public enum OutboundHTTP {
    public static func makeClient(
        connectTimeout: Duration = .seconds(10), readTimeout: Duration = .seconds(60), connectionsPerHost: Int = 8
    ) -> HTTPClient {
        var configuration = HTTPClient.Configuration()
        configuration.redirectConfiguration = .disallow
        configuration.timeout = .init(connect: .init(connectTimeout), read: .init(readTimeout))
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: max(connectionsPerHost, 1))
        configuration.connectionPool.retryConnectionEstablishment = false
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    /// The host (and port, when not the scheme's default) of a URL, for messages.
    public static func hostDescription(_ url: String) -> String {
        guard let components = URLComponents(string: url), let host = components.host else { return "the server" }
        if let port = components.port { return "\(host):\(port)" }
        return host
    }
}

/// What a failed HTTP exchange means: whether the request can have reached the server, and why it failed,
/// in words an operator can act on.
public struct TransportFailure: Sendable, CustomStringConvertible {
    /// False when the failure happened before any byte of the request left (DNS, refused or timed-out
    /// connect, TLS handshake): the server cannot have acted on it.
    public var requestMayHaveBeenSent: Bool
    /// Whether the server could not be reached at all.
    public var isUnreachable: Bool
    /// "connection refused", "DNS lookup failed (host not found)", "read timed out", …
    public var reason: String

    public var description: String { reason }

    public init(_ error: any Error) {
        switch error {
        case let error as NIOConnectionError:
            requestMayHaveBeenSent = false
            isUnreachable = true
            if error.dnsAError != nil || error.dnsAAAAError != nil, error.connectionErrors.isEmpty {
                reason = "DNS lookup failed (host not found)"
            } else if let first = error.connectionErrors.first {
                reason = Self.describeConnect(first.error)
            } else {
                reason = "could not connect"
            }
        case is SocketAddressError:
            requestMayHaveBeenSent = false
            isUnreachable = true
            reason = "DNS lookup failed (host not found)"
        case let error as NIOSSLError:
            if case .handshakeFailed = error {
                requestMayHaveBeenSent = false
                isUnreachable = true
                reason = "TLS handshake failed: \(error)"
            } else {
                requestMayHaveBeenSent = true
                isUnreachable = false
                reason = "TLS error: \(error)"
            }
        case let error as ChannelError where Self.isConnectTimeout(error):
            requestMayHaveBeenSent = false
            isUnreachable = true
            reason = "connection timed out"
        case let error as IOError where Self.connectErrnos.contains(error.errnoCode):
            requestMayHaveBeenSent = false
            isUnreachable = true
            reason = Self.describeConnect(error)
        case let error as HTTPClientError:
            switch error {
            case .connectTimeout:
                requestMayHaveBeenSent = false
                isUnreachable = true
                reason = "connection timed out"
            case .invalidURL, .emptyHost, .emptyScheme:
                requestMayHaveBeenSent = false
                isUnreachable = false
                reason = "the request could not be made: \(error)"
            case .readTimeout:
                requestMayHaveBeenSent = true
                isUnreachable = false
                reason = "read timed out"
            case .deadlineExceeded:
                requestMayHaveBeenSent = true
                isUnreachable = false
                reason = "no answer in time"
            case .remoteConnectionClosed:
                requestMayHaveBeenSent = true
                isUnreachable = false
                reason = "the server closed the connection before answering"
            default:
                requestMayHaveBeenSent = true
                isUnreachable = false
                reason = "\(error)"
            }
        default:
            requestMayHaveBeenSent = true
            isUnreachable = false
            reason = "\(error)"
        }
    }

    private static func isConnectTimeout(_ error: ChannelError) -> Bool {
        if case .connectTimeout = error { return true }
        return false
    }

    private static let connectErrnos: Set<Int32> = [ECONNREFUSED, ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL, ENETDOWN, EHOSTDOWN]

    private static func describeConnect(_ error: any Error) -> String {
        if let error = error as? IOError {
            return String(cString: strerror(error.errnoCode)).lowercased()
        }
        if let error = error as? ChannelError, isConnectTimeout(error) {
            return "connection timed out"
        }
        return "\(error)"
    }
}

import ChatBridgeCore
import Crypto
import Foundation

/// The HMAC-SHA256 signature DingTalk puts on HTTP callbacks: `Base64(HMAC(secret, timestamp + "\n" + secret))`.
public enum DingTalkSignature {
    public static func sign(timestamp: String, secret: String) -> String {
        let key = SymmetricKey(data: Data(secret.utf8))
        let mac = HMAC<SHA256>.authenticationCode(for: Data((timestamp + "\n" + secret).utf8), using: key)
        return Data(mac).base64EncodedString()
    }

    public enum Failure: Error, Equatable, CustomStringConvertible {
        case missingHeaders
        case malformedTimestamp
        case staleTimestamp
        case badSignature

        public var description: String {
            switch self {
            case .missingHeaders: "missing timestamp or sign header"
            case .malformedTimestamp: "timestamp header is not a number of milliseconds"
            case .staleTimestamp: "timestamp is more than one hour away from the server's clock"
            case .badSignature: "signature does not match"
            }
        }
    }

    /// Verifies a callback's headers: the signature (compared in constant time) and a ±1 hour window.
    public static func verify(timestamp: String?, sign: String?, secret: String, now: Date, window: TimeInterval = 3600) throws(Failure) {
        guard let timestamp, let sign, !timestamp.isEmpty, !sign.isEmpty else { throw .missingHeaders }
        guard let millis = Int64(timestamp) else { throw .malformedTimestamp }
        let sent = Date(timeIntervalSince1970: Double(millis) / 1000)
        guard abs(now.timeIntervalSince(sent)) <= window else { throw .staleTimestamp }
        let expected = Array(Self.sign(timestamp: timestamp, secret: secret).utf8)
        let given = Array(sign.utf8)
        guard constantTimeEqual(expected, given) else { throw .badSignature }
    }
}

import Foundation

/// Credentials and limits for one DingTalk robot.
public struct DingTalkSettings: Sendable, Equatable {
    /// AppKey / Client ID.
    public var clientID: String
    /// AppSecret / Client Secret: signs callbacks and obtains access tokens.
    public var clientSecret: String
    /// Robot code; for enterprise-internal apps the same as the client id. A message addressed to another
    /// robot code is refused.
    public var robotCode: String
    /// When set, a message whose `chatbotCorpId` differs is refused.
    public var corpID: String?
    public var apiBaseURL: String
    /// Hosts a sessionWebhook may point at. Any other URL is never requested.
    public var webhookHosts: [String]
    public var maxMessageChars: Int
    /// How messages arrive: over the outbound Stream connection as well as HTTP callbacks, or callbacks only.
    public var mode: Mode = .stream
    public var stream = StreamSettings()
    public var card = CardSettings()

    public enum Mode: String, Sendable, Equatable, CaseIterable {
        /// Open the Stream connection (when the client id and secret are set); callbacks keep working.
        case stream
        /// HTTP callbacks only.
        case http
    }

    /// The Stream-mode connection (protocols C).
    public struct StreamSettings: Sendable, Equatable {
        /// A WebSocket ping goes out this often; a connection whose ping is unanswered by the next one is
        /// dropped and reconnected, so a silent ("zombie") connection is found within twice this.
        public var keepaliveTimeout: Duration = .seconds(10)
        /// The first reconnect delay; it doubles (with jitter) up to `maxBackoff`, and resets once a
        /// connection has stayed up for `healthyAfter`.
        public var initialBackoff: Duration = .seconds(1)
        public var maxBackoff: Duration = .seconds(60)
        public var healthyAfter: Duration = .seconds(60)
        /// After a `disconnect`, how long the old connection may keep delivering once the new one is up,
        /// before it is closed (DingTalk closes it itself about 10 s after the notice).
        public var rotationGrace: Duration = .seconds(15)
        /// Hosts the endpoint returned by `connections/open` may name. Any other is never connected to.
        public var endpointHosts: [String] = ["wss-open-connection.dingtalk.com", "wss-open-connection-union.dingtalk.com"]
        public init() {}
    }

    /// AI cards: answers that grow while the model writes them (protocols D.1).
    public struct CardSettings: Sendable, Equatable {
        /// The AI-card template; empty means no cards (markdown replies).
        public var templateID: String = ""
        /// The template's streaming markdown variable.
        public var contentKey: String = "msgContent"
        /// At most one streaming update per card this often.
        public var updateInterval: Duration = .milliseconds(500)
        /// Card API calls per second across all cards of the process.
        public var maxQPS: Int = 20
        /// The pause after a QPS-limit answer before the call is tried again (with a new guid).
        public var qpsLimitPause: Duration = .seconds(2)
        public init() {}
        public var isEnabled: Bool { !templateID.isEmpty }
    }

    /// The only path a sessionWebhook may have.
    public static let webhookPath = "/robot/sendBySession"

    public init(
        clientID: String = "", clientSecret: String = "", robotCode: String? = nil, corpID: String? = nil,
        apiBaseURL: String = "https://api.dingtalk.com",
        webhookHosts: [String] = ["oapi.dingtalk.com", "api.dingtalk.com"], maxMessageChars: Int = 4000
    ) {
        self.clientID = clientID
        self.clientSecret = clientSecret
        self.robotCode = (robotCode?.isEmpty == false ? robotCode! : clientID)
        self.corpID = corpID?.isEmpty == false ? corpID : nil
        self.apiBaseURL = apiBaseURL
        self.webhookHosts = webhookHosts
        self.maxMessageChars = maxMessageChars
    }

    /// Whether the OpenAPI can be used (access token and robot sends).
    public var hasOpenAPICredentials: Bool { !clientID.isEmpty && !clientSecret.isEmpty }

    /// What is missing before HTTP callbacks can be verified, or nil when nothing is.
    public var callbackConfigurationProblem: String? {
        if clientSecret.isEmpty {
            return "DingTalk is not configured: set dingtalk.client_secret (CHATBRIDGE_DINGTALK_CLIENT_SECRET) to the robot's AppSecret"
        }
        if robotCode.isEmpty {
            return "DingTalk is not configured: set dingtalk.client_id (CHATBRIDGE_DINGTALK_CLIENT_ID) to the robot's AppKey, so messages for other robots are refused"
        }
        return nil
    }

    /// Whether a sessionWebhook URL may be requested: the documented form only — https to a listed host
    /// (plain http only to a listed loopback host, for local testing), path `/robot/sendBySession`, no
    /// credentials in the URL.
    public func allowsWebhook(_ url: String) -> Bool {
        guard let components = URLComponents(string: url), let scheme = components.scheme?.lowercased(),
            let host = components.host?.lowercased(), !host.isEmpty, components.user == nil, components.password == nil,
            components.percentEncodedPath == Self.webhookPath, components.fragment == nil
        else { return false }
        let listed = webhookHosts.contains { $0.lowercased() == host }
        guard listed else { return false }
        switch scheme {
        case "https": return true
        case "http": return ["127.0.0.1", "localhost", "::1", "[::1]"].contains(host)
        default: return false
        }
    }

    /// Whether a Stream endpoint returned by `connections/open` may be connected to: `wss://` to a listed
    /// host (plain `ws://` only to a listed loopback host, for local testing), no credentials in the URL.
    public func allowsStreamEndpoint(_ url: String) -> Bool {
        guard let components = URLComponents(string: url), let scheme = components.scheme?.lowercased(),
            let host = components.host?.lowercased(), !host.isEmpty, components.user == nil, components.password == nil,
            components.fragment == nil, stream.endpointHosts.contains(where: { $0.lowercased() == host })
        else { return false }
        switch scheme {
        case "wss": return true
        case "ws": return ["127.0.0.1", "localhost", "::1", "[::1]"].contains(host)
        default: return false
        }
    }
}

/// Lark / Feishu settings (`lark.*`).
public struct LarkSettings: Sendable, Equatable {
    /// How events arrive.
    public enum Mode: String, Sendable, CaseIterable {
        /// The long connection (no public URL needed).
        case websocket
        /// HTTPS callbacks to `POST /callbacks/lark`.
        case webhook
    }

    /// Which group messages are answered.
    public enum GroupReply: String, Sendable, CaseIterable {
        /// Only those that @-mention the bot itself (by its open_id, never its display name).
        case mention
        /// Every group message the app receives.
        case all
    }

    /// How an answer is shown.
    public enum CardMode: String, Sendable, CaseIterable {
        /// A CardKit card streamed into.
        case cardkit
        /// An interactive card patched while the model writes.
        case patch
        /// One text message.
        case off
    }

    public var appID: String
    public var appSecret: String
    public var verificationToken: String
    public var encryptKey: String
    /// `https://open.feishu.cn`, or `https://open.larksuite.com` for Lark.
    public var baseURL: String
    public var mode: Mode
    public var groupReply: GroupReply
    /// Answer in the message's thread; a thread is then its own conversation.
    public var replyInThread: Bool
    public var cardMode: CardMode
    public var cardUpdateInterval: Duration

    public init(
        appID: String = "", appSecret: String = "", verificationToken: String = "", encryptKey: String = "",
        baseURL: String = "https://open.feishu.cn", mode: Mode = .websocket, groupReply: GroupReply = .mention,
        replyInThread: Bool = false, cardMode: CardMode = .cardkit, cardUpdateInterval: Duration = .milliseconds(500)
    ) {
        self.appID = appID
        self.appSecret = appSecret
        self.verificationToken = verificationToken
        self.encryptKey = encryptKey
        self.baseURL = baseURL
        self.mode = mode
        self.groupReply = groupReply
        self.replyInThread = replyInThread
        self.cardMode = cardMode
        self.cardUpdateInterval = cardUpdateInterval
    }

    /// The app can call the OpenAPI (tokens, replies, bot info).
    public var hasCredentials: Bool { !appID.isEmpty && !appSecret.isEmpty }

    /// Why the webhook route cannot accept events, or nil when it can: it never accepts unauthenticated ones.
    public var webhookConfigurationProblem: String? {
        if encryptKey.isEmpty && verificationToken.isEmpty {
            return "Lark webhook events cannot be authenticated: set lark.encrypt_key (CHATBRIDGE_LARK_ENCRYPT_KEY) and/or lark.verification_token (CHATBRIDGE_LARK_VERIFICATION_TOKEN) from the app's Events & Callbacks page"
        }
        return nil
    }
}
